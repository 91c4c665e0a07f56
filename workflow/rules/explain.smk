# Results that explain themselves: diagnostics, verdicts, plots and one HTML page from the
# summary. The plots are marked for `snakemake --report` as well.


rule explain:
    input:
        summary="results/summary.parquet",
        study=paths.study_file(),
    output:
        diagnostics="results/tables/diagnostics.md",
        verdicts="results/tables/verdicts.md",
        html="results/report/index.html",
        throughput=report(
            "results/plots/throughput.png",
            caption="../report/throughput.rst",
            category="Plots",
        ),
        latency=report(
            "results/plots/latency.png",
            caption="../report/latency.rst",
            category="Plots",
        ),
        machines=report(
            "results/plots/machines.png",
            caption="../report/machines.rst",
            category="Plots",
        ),
    log:
        "results/logs/explain.log",
    params:
        study=STUDY["study"],
        baseline_id=STUDY["baseline"],
        baseline_name=CELLS[STUDY["baseline"]]["name"],
        expectations=json.dumps(config.get("expectations", [])),
        bandwidth=json.dumps(config.get("bandwidth_gb_s", {})),
        statistics=json.dumps(STUDY["statistics"], sort_keys=True),
    shell:
        "cellbench explain --summary {input.summary} --study {params.study} --statistics {params.statistics:q} "
        "--baseline-id {params.baseline_id} --baseline-name {params.baseline_name} "
        "--expectations {params.expectations:q} --bandwidth {params.bandwidth:q} "
        "--tables results/tables --plots results/plots --html {output.html} > {log} 2>&1"
