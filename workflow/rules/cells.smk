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
        # The shape of an id, not an alternation of every id (that regex makes 10k-cell DAGs slow).
        cell_id=r"[a-z0-9_.-]+-[0-9a-f]{10}",
    resources:
        # One Slurm job per cell asks for the cell's own CPUs, memory, GPUs and time limit.
        cpus_per_task=lambda wildcards: JOBS[wildcards.cell_id]["cpus_per_task"],
        mem_mb=lambda wildcards: JOBS[wildcards.cell_id]["mem_mb"],
        runtime=lambda wildcards: JOBS[wildcards.cell_id]["runtime"],
        gres=lambda wildcards: JOBS[wildcards.cell_id]["gres"],
        # `--resources gpu=K` bounds the GPUs of cells running at once; cellbench.slots picks which.
        gpu=lambda wildcards: CELLS[wildcards.cell_id]["resources"]["gpus"],
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
