# The report's figures: `snakemake --report report.html` (self-contained) or `--report report.zip`.
# One rule reads what the pipeline wrote and makes the tables and figures; captions: workflow/report/*.rst.
FIGURES = "figures"


rule figures:
    input:
        data=DATA,
        classifier="models/classifier.pt",
        segmenter="models/segmenter.pt",
        cams="cams",
        pseudo="pseudo",
        seeds="metrics/seeds.json",
        pseudo_metrics="metrics/pseudo.json",
        segmentation="metrics/segmentation.json",
        seed_curve="plots/seeds_threshold.csv",
        cls_curve="plots/train_cls.csv",
        seg_curve="plots/train_seg.csv",
    output:
        table=report(
            f"{FIGURES}/methods.html",
            caption="../report/methods.rst",
            category="1. Results",
            labels={"figure": "mIoU per stage and method"},
        ),
        table_csv=f"{FIGURES}/methods.csv",
        per_class=report(
            f"{FIGURES}/per_class_iou.png",
            caption="../report/per_class_iou.rst",
            category="1. Results",
            labels={"figure": "IoU per class"},
        ),
        per_class_csv=f"{FIGURES}/per_class_iou.csv",
        threshold=report(
            f"{FIGURES}/threshold.png",
            caption="../report/threshold.rst",
            category="2. Seeds",
            labels={"figure": "seed mIoU vs threshold"},
        ),
        training=report(
            f"{FIGURES}/training.png",
            caption="../report/training.rst",
            category="3. Training",
            labels={"figure": "loss and learning rate"},
        ),
        gallery=report(
            f"{FIGURES}/gallery.png",
            caption="../report/gallery.rst",
            category="4. Gallery",
            labels={"figure": "image, ground truth, CAM, AdvCAM, pseudo label, prediction"},
        ),
    params:
        cfg=params_json("dataset", "classifier", "cam", "refine", "evaluation", inactive=True),
    log:
        "logs/figures.log",
    conda:
        "../envs/advcam.yaml"
    shell:
        "advcam figures --params-json {params.cfg:q} --data {input.data} --classifier {input.classifier} --segmenter {input.segmenter} --cams {input.cams} --pseudo {input.pseudo} --metrics-dir $(dirname {input.seeds}) --plots $(dirname {input.seed_curve}) --out $(dirname {output.table}) 2>&1 | tee -i {log}"
