# All rows of the study (and imported ones) -> summary.parquet and the tables.


rule aggregate:
    input:
        metrics=expand(paths.cell_metrics("{cell_id}"), cell_id=sorted(CELLS)),
    output:
        summary="results/summary.parquet",
        markdown="results/tables/summary.md",
        csv="results/tables/summary.csv",
    log:
        "results/logs/aggregate.log",
    params:
        study=STUDY["study"],
        baseline_id=STUDY["baseline"],
        baseline_name=CELLS[STUDY["baseline"]]["name"],
    shell:
        "cellbench aggregate --study {params.study} --baseline-id {params.baseline_id} "
        "--baseline-name {params.baseline_name} --summary {output.summary} "
        "--tables results/tables {input.metrics} > {log} 2>&1"
