rule refine:
    input:
        data=DATA,
        cams="cams",
    output:
        pseudo=directory("pseudo"),
        metrics="metrics/pseudo.json",
    params:
        cfg=params_json("dataset", "refine"),
    log:
        "logs/refine.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam refine --params-json {params.cfg:q} --data {input.data} --cams {input.cams} --out {output.pseudo} --metrics {output.metrics} 2>&1 | tee {log}"
