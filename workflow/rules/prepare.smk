rule prepare:
    input:
        lists=outside_files("dataset"),
    output:
        directory(DATA),
    params:
        cfg=params_json("dataset", "synthetic"),
    log:
        "logs/prepare.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam prepare --params-json {params.cfg:q} --out {output} 2>&1 | tee -i {log}"
