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
        paths.model_manifest(paths.MODEL),
    log:
        paths.model_log(paths.MODEL),
    wildcard_constraints:
        model=paths.one_of(config["models"]),
    params:
        spec=lambda wildcards: json.dumps(config["models"][wildcards.model]),
        out_dir=lambda wildcards: paths.model_dir(wildcards.model),
        image_arg=lambda wildcards, input: (
            f"--image-manifest {input.image}" if "image" in input.keys() else ""
        ),
    shell:
        "cellbench prepare-model --name {wildcards.model} --spec {params.spec:q} "
        "{params.image_arg} --out-dir {params.out_dir} --log {log}"
