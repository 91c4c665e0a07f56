# One container per cell. A cell's own failure is rows with a status, not a failed job.


rule run_cell:
    input:
        image=lambda wildcards: paths.image_manifest(CELLS[wildcards.cell_id]["image"]),
        model=lambda wildcards: paths.model_manifest(CELLS[wildcards.cell_id]["model"]),
        bench=ROOT / "scripts" / "bench_cell.py",
    output:
        metrics="results/cells/{cell_id}/metrics.parquet",
        provenance="results/cells/{cell_id}/provenance.json",
        engine_log="results/cells/{cell_id}/engine.log",
    log:
        "results/logs/cells/{cell_id}.log",
    wildcard_constraints:
        cell_id="|".join(re.escape(cell_id) for cell_id in CELLS),
    params:
        cell=lambda wildcards: json.dumps(CELLS[wildcards.cell_id], sort_keys=True),
        model_dir=lambda wildcards: paths.model_dir(CELLS[wildcards.cell_id]["model"]),
        study=STUDY["study"],
        config_hash=STUDY["config_hash"],
        machine_id=MACHINE_ID,
    shell:
        "cellbench run-cell --cell {params.cell:q} --study {params.study} "
        "--config-hash {params.config_hash} --machine-id {params.machine_id} "
        "--image-manifest {input.image} --model-dir {params.model_dir} 2> {log}"
