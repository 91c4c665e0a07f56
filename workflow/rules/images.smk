# Engine images, built from pinned recipes under containers/<name>/ (no registry needed).


rule build_image:
    input:
        lambda wildcards: images.context_files(
            ROOT / config["images"][wildcards.image]["context"]
        ),
        base=ROOT / "containers" / "base" / "build.sh",
    output:
        paths.image_manifest(paths.IMAGE),
    log:
        paths.image_log(paths.IMAGE),
    wildcard_constraints:
        image=paths.one_of(config["images"]),
    params:
        spec=lambda wildcards: json.dumps(config["images"][wildcards.image]),
    shell:
        "cellbench build-image --name {wildcards.image} --spec {params.spec:q} "
        "--out {output} --log {log}"
