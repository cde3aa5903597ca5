rule train_seg:
    input:
        data=DATA,
        weights=outside_files("segmentation"),
        pseudo="pseudo",
    output:
        model="models/segmenter.pt",
        curves="plots/train_seg.csv",
    params:
        cfg=params_json("dataset", "segmentation"),
    log:
        "logs/train_seg.log",
    resources:
        gpu=1,
        loader_workers=LOADER_WORKERS,
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam train-seg --params-json {params.cfg:q} --set workers={resources.loader_workers} --data {input.data} --pseudo {input.pseudo} --out {output.model} --curves {output.curves} 2>&1 | tee -i {log}"


rule evaluate:
    input:
        data=DATA,
        model="models/segmenter.pt",
        cams="cams",
        pseudo="pseudo",
    output:
        metrics="metrics/segmentation.json",
        plots=directory("plots/evaluation"),
    params:
        cfg=params_json("dataset", "segmentation", "evaluation"),
    log:
        "logs/evaluate.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam evaluate --params-json {params.cfg:q} --data {input.data} --model {input.model} --cams {input.cams} --pseudo {input.pseudo} --metrics {output.metrics} --plots {output.plots} 2>&1 | tee -i {log}"


rule predict:
    input:
        data=DATA,
        model="models/segmenter.pt",
        lists=lambda w: outside_list(w.predict_list),
    output:
        masks=directory("predictions/{predict_list}"),
    wildcard_constraints:
        predict_list=r"[A-Za-z0-9_.-]+",
    params:
        cfg=params_json("dataset", "segmentation", "evaluation"),
    log:
        "logs/predict_{predict_list}.log",
    resources:
        gpu=1,
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam predict --params-json {params.cfg:q} --set predict.list={wildcards.predict_list} --data {input.data} --model {input.model} --out {output.masks} 2>&1 | tee -i {log}"
