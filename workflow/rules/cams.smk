# Class maps, scattered over `workflow.shards` image shards (one job each; a GPU job under the SLURM
# profile) and gathered by `cams`, which links the shards' files into cams/ and scores the seeds over all
# images. Any number of shards gives byte-identical results (advcam/steps/shards.py). A shard computes into the
# work folder (WORK, rules/common.smk) and links its files into its output, so a killed shard's rerun keeps the
# finished images although Snakemake empties the output first (docs/reliability.md).


rule cams_shard:
    input:
        data=DATA,
        model="models/classifier.pt",
    output:
        temp(directory("shards/cams/{shard}-of-{n}")),
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        cfg=params_json("dataset", "cam"),
        work=WORK,
    log:
        "logs/cams_shard/{shard}-of-{n}.log",
    resources:
        gpu=1,
    conda:
        "../envs/advcam.yaml"
    shell:
        "ADVCAM_WORK_DIR={params.work:q} advcam cams --params-json {params.cfg:q} --data {input.data} --model {input.model} --shard {wildcards.shard}/{wildcards.n} --out {output} 2>&1 | tee -i {log}"


rule cams:
    input:
        data=DATA,
        model="models/classifier.pt",
        shards=shard_folders("cams"),
    output:
        cams=directory("cams"),
        metrics="metrics/seeds.json",
        curve="plots/seeds_threshold.csv",
    params:
        cfg=params_json("dataset", "cam"),
        work=WORK,
    log:
        "logs/cams.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "ADVCAM_WORK_DIR={params.work:q} advcam cams --params-json {params.cfg:q} --data {input.data} --model {input.model} --gather {input.shards} --out {output.cams} --metrics {output.metrics} --curve {output.curve} 2>&1 | tee -i {log}"
