# All rows of the study (and imported ones) -> summary.parquet and the tables.


rule aggregate:
    input:
        # A function, so that the list is made when the job is, not at parse time for every run.
        metrics=lambda wildcards: paths.round_files(CELLS),
        # The study itself (rewritten only when it changes): tables of another study are stale.
        study=paths.study_file(),
        # Globbed when the DAG is built: after `cellbench import`, the next run refreshes the tables.
        imported=lambda wildcards: paths.imported_metrics(),
    output:
        summary=paths.summary(),
        markdown=paths.summary_markdown(),
        csv=paths.summary_csv(),
        machines_md=paths.machines_markdown(),
        machines_csv=paths.machines_csv(),
    log:
        paths.step_log("aggregate"),
    params:
        study=STUDY["study"],
        baseline_id=STUDY["baseline"],
        baseline_name=CELLS[STUDY["baseline"]]["name"],
        machine_id=MACHINE_ID,
        statistics=json.dumps(STUDY["statistics"], sort_keys=True),
    shell:
        "cellbench aggregate --study {params.study} --baseline-id {params.baseline_id} "
        "--baseline-name {params.baseline_name} --summary {output.summary} --statistics {params.statistics:q} "
        "--machine-id {params.machine_id} "
        # Spelled into the command (not a param), so the rule's code is the same text as ever.
        f"--tables {paths.tables_dir()} "
        "--study-file {input.study} {input.imported} > {log} 2>&1"
