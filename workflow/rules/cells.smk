# One container per round of a cell. A cell's own failure is rows with a status, not a failed
# job. Rounds interleave: every cell's round 1 runs before any round 2 (priorities).


rule run_cell:
    input:
        image=RUN_CELL["image"],
        model=RUN_CELL["model"],
        bench=ROOT / "scripts" / "bench_cell.py",
        contract=ROOT / "workflow" / "cellbench" / "contract.py",
        serving=ROOT / "workflow" / "cellbench" / "serving.py",
    output:
        metrics=paths.cell_metrics(paths.CELL_ID, paths.ROUND),
        provenance=paths.cell_provenance(paths.CELL_ID, paths.ROUND),
        engine_log=paths.cell_log(paths.CELL_ID, paths.ROUND),
        telemetry=paths.cell_telemetry(paths.CELL_ID, paths.ROUND),
        profile=paths.cell_profile(paths.CELL_ID, paths.ROUND),
    log:
        paths.round_log(paths.CELL_ID, paths.ROUND),
    wildcard_constraints:
        cell_id=paths.CELL_ID_SHAPE,
        round=paths.ROUND_SHAPE,
    priority: lambda wildcards: ROUND_PRIORITY[(wildcards.cell_id, int(wildcards.round))]
    resources:
        # One Slurm job per cell asks for the cell's own CPUs, memory, GPUs and time limit.
        cpus_per_task=RUN_CELL["cpus_per_task"],
        mem_mb=RUN_CELL["mem_mb"],
        runtime=RUN_CELL["runtime"],
        gres=RUN_CELL["gres"],
        # `--resources gpu=K` bounds the GPUs of cells running at once; cellbench.slots picks which.
        gpu=RUN_CELL["gpu"],
    params:
        cell=lambda wildcards: json.dumps(CELLS[wildcards.cell_id], sort_keys=True),
        model_dir=RUN_CELL["model_dir"],
        study=STUDY["study"],
        config_hash=STUDY["config_hash"],
        machine_id=MACHINE_ID,
    shell:
        "cellbench run-cell --cell {params.cell:q} --study {params.study} "
        "--config-hash {params.config_hash} --machine-id {params.machine_id} "
        "--image-manifest {input.image} --model-dir {params.model_dir} --round {wildcards.round} 2> {log}"
