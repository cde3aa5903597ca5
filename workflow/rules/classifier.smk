rule train_cls:
    input:
        data=DATA,
        weights=outside_files("classifier"),
    output:
        model="models/classifier.pt",
        curves="plots/train_cls.csv",
    params:
        cfg=params_json("dataset", "classifier"),
    log:
        "logs/train_cls.log",
    resources:
        gpu=1,
        loader_workers=LOADER_WORKERS,
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam train-cls --params-json {params.cfg:q} --set workers={resources.loader_workers} --data {input.data} --out {output.model} --curves {output.curves} 2>&1 | tee -i {log}"
