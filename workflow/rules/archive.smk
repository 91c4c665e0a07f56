# Share: `snakemake --cores 1 archive` packs this machine's results into results/archive/.
# Not part of `all`; the file name carries a time stamp, so the rule has no fixed output and
# runs every time it is asked for.


rule archive:
    input:
        study=paths.study_file(),
        # A function: made only when the archive is asked for, not whenever the Snakefile is read.
        cells=lambda wildcards: [
            path
            for name in paths.ROUND_FILES
            for path in paths.round_files(CELLS, name)
        ],
        images=sorted({paths.image_manifest(cell["image"]) for cell in CELLS.values()}),
        models=sorted({paths.model_manifest(cell["model"]) for cell in CELLS.values()}),
    log:
        paths.step_log("archive"),
    params:
        machine_id=MACHINE_ID,
    shell:
        "cellbench archive --study-file {input.study} --machine-id {params.machine_id} 2> {log}"
