# Results that explain themselves: diagnostics, verdicts, plots and one HTML page from the
# summary. The plots are marked for `snakemake --report` as well.


rule report:
    input:
        # The summary is rewritten whenever a round is (every round's telemetry and profile are
        # written by the job that writes its metrics), so it stands for them: listing them was
        # 2 inputs per round, 60,000 in a 10,000-cell study, for Snakemake to build and stat.
        summary=paths.summary(),
        study=paths.study_file(),
    output:
        diagnostics=paths.diagnostics(),
        verdicts=paths.verdicts(),
        html=paths.report_html(),
        throughput=report(
            paths.plot("throughput.png"),
            caption="../report/throughput.rst",
            category="Plots",
        ),
        latency=report(
            paths.plot("latency.png"),
            caption="../report/latency.rst",
            category="Plots",
        ),
        machines=report(
            paths.plot("machines.png"),
            caption="../report/machines.rst",
            category="Plots",
        ),
        quality=report(
            paths.plot("quality.png"),
            caption="../report/quality.rst",
            category="Plots",
        ),
        telemetry=report(
            paths.plot("telemetry.png"),
            caption="../report/telemetry.rst",
            category="Plots",
        ),
        serve_latency=report(
            paths.plot("serve-latency.png"),
            caption="../report/serve-latency.rst",
            category="Plots",
        ),
        serve_goodput=report(
            paths.plot("serve-goodput.png"),
            caption="../report/serve-goodput.rst",
            category="Plots",
        ),
    log:
        paths.step_log("report"),
    params:
        study=STUDY["study"],
        baseline_id=STUDY["baseline"],
        baseline_name=CELLS[STUDY["baseline"]]["name"],
        expectations=json.dumps(config.get("expectations", [])),
        bandwidth=json.dumps(config.get("bandwidth_gb_s", {})),
        statistics=json.dumps(STUDY["statistics"], sort_keys=True),
    shell:
        "cellbench report --summary {input.summary} --study {params.study} --statistics {params.statistics:q} "
        "--baseline-id {params.baseline_id} --baseline-name {params.baseline_name} "
        "--expectations {params.expectations:q} --bandwidth {params.bandwidth:q} "
        # Spelled into the command (not params), so the rule's code is the same text as ever.
        f"--tables {paths.tables_dir()} --plots {paths.plots_dir()} "
        "--study-file {input.study} --html {output.html} > {log} 2>&1"
