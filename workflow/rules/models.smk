# Models, prepared on the host (never fetched inside a cell): pypi-gguf models are converted in
# an engine image; hf-cache models are resolved in the user's hub cache and hashed.


rule prepare_model:
    input:
        unpack(
            lambda wildcards: paths.model_inputs(
                config["models"][wildcards.model], ROOT
            )
        ),
    output:
        "results/models/{model}/manifest.json",
    log:
        "results/logs/models/{model}.log",
    wildcard_constraints:
        model="|".join(re.escape(name) for name in config["models"]),
    params:
        spec=lambda wildcards: json.dumps(config["models"][wildcards.model]),
        out_dir=lambda wildcards: paths.model_dir(wildcards.model),
        image_arg=lambda wildcards, input: (
            f"--image-manifest {input.image}" if "image" in input.keys() else ""
        ),
    shell:
        "cellbench prepare-model --name {wildcards.model} --spec {params.spec:q} "
        "{params.image_arg} --out-dir {params.out_dir} --log {log}"
