rule cams:
    input:
        data=DATA,
        model="models/classifier.pt",
    output:
        cams=directory("cams"),
        metrics="metrics/seeds.json",
        curve="plots/seeds_threshold.csv",
    params:
        cfg=params_json("dataset", "cam"),
    log:
        "logs/cams.log",
    resources:
        gpu=1,
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam cams --params-json {params.cfg:q} --data {input.data} --model {input.model} --out {output.cams} --metrics {output.metrics} --curve {output.curve} 2>&1 | tee {log}"
