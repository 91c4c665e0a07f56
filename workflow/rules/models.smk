# Models, prepared on the host from local packages (never fetched inside a cell).


rule prepare_model:
    input:
        image=lambda wildcards: paths.image_manifest(
            config["models"][wildcards.model]["prepare_image"]
        ),
        converter=ROOT / "scripts" / "convert_gguf.py",
    output:
        "results/models/{model}/manifest.json",
    log:
        "results/logs/models/{model}.log",
    wildcard_constraints:
        model="|".join(re.escape(name) for name in config["models"]),
    params:
        spec=lambda wildcards: json.dumps(config["models"][wildcards.model]),
        out_dir=lambda wildcards: paths.model_dir(wildcards.model),
    shell:
        "cellbench prepare-model --name {wildcards.model} --spec {params.spec:q} "
        "--image-manifest {input.image} --out-dir {params.out_dir} --log {log}"
