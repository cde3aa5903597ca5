# Pseudo labels. The dense CRF (the costly CPU part) is scattered over `workflow.shards` image shards;
# `refine` gathers the CRF labels, then (refine.method randomwalk) trains the affinity network once on all
# of them and walks every image (a GPU job then), and scores the pseudo labels over all images. The per-image
# work (and the affinity resume file) goes to the work folder (WORK, rules/common.smk) first, so a rerun after a
# kill keeps it although Snakemake empties the outputs (docs/reliability.md).


rule refine_shard:
    input:
        data=DATA,
        cams="cams",
    output:
        temp(directory("shards/refine/{shard}-of-{n}")),
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        cfg=params_json("dataset", "refine"),
        work=WORK,
    log:
        "logs/refine_shard/{shard}-of-{n}.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "ADVCAM_WORK_DIR={params.work:q} advcam refine --params-json {params.cfg:q} --data {input.data} --cams {input.cams} --shard {wildcards.shard}/{wildcards.n} --out {output} 2>&1 | tee -i {log}"


rule refine:
    input:
        data=DATA,
        cams="cams",
        shards=shard_folders("refine"),
        # the affinity network of refine.method randomwalk: refine.randomwalk.trained, else refine.randomwalk.pretrained
        # or classifier.pretrained (irn, affinitynet); refine.randomwalk.psa.trained (psa)
        weights=affinity_weights(),
    output:
        pseudo=directory("pseudo"),
        metrics="metrics/pseudo.json",
    params:
        # classifier: the affinity network of refine.method randomwalk may use classifier.arch / pretrained
        cfg=params_json("dataset", "refine", "classifier"),
        work=WORK,
    log:
        "logs/refine.log",
    resources:
        gpu=1 if config["refine"]["method"] == "randomwalk" else 0,
        loader_workers=LOADER_WORKERS,
    conda:
        "../envs/advcam.yaml"
    shell:
        "ADVCAM_WORK_DIR={params.work:q} advcam refine --params-json {params.cfg:q} --set workers={resources.loader_workers} --data {input.data} --cams {input.cams} --gather {input.shards} --out {output.pseudo} --metrics {output.metrics} 2>&1 | tee -i {log}"
