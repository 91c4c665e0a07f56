# cellbench: build engine images, prepare models, run every cell of a study in its own
# container, aggregate Parquet metrics into tables. The logic lives in workflow/cellbench/.
import json
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

ROOT = Path(workflow.basedir)
sys.path.insert(0, str(ROOT / "workflow"))
# Modules without pandas or polars: every snakemake invocation (on Slurm, every cell's job)
# reads this file.
from cellbench import (
    config as study_config,
    images,
    lifecycle,
    paths,
    provenance,
    runtimes,
)  # noqa: E402
from cellbench import scheduling  # noqa: E402

DEFAULT_STUDY = ROOT / "config" / "config.yaml"
# The rules' `cellbench` must run this checkout's code (its recipes, its commit in provenance).
os.environ[paths.CHECKOUT_ENV] = str(ROOT)

# A --configfile replaces the default study instead of being merged into it: merging would
# leak the CPU study's defaults and cells into a GPU study. The study is read again from its
# files by cellbench's own loader, the one `cellbench validate` uses (study_config.read), and
# replaces what Snakemake's loader made of them (it evaluates YTE, drops duplicate keys, reads
# JSON's NaN): one reading and one validation, so both entry points give the same answer.
try:
    study, STUDY = study_config.read(
        workflow.overwrite_configfiles or [DEFAULT_STUDY],
        overrides=dict(workflow.config_settings.config),  # --config KEY=VALUE
    )
    config.clear()
    config.update(study)
    # Constants where every cell agrees, functions of the job's cell id elsewhere.
    RUN_CELL = scheduling.run_cell_attributes(STUDY["cells"])
    ROUND_PRIORITY = scheduling.round_priorities(STUDY["cells"])
    MACHINE_ID = provenance.machine_id(config.get("machine_id"))
    # CELLBENCH_RUNTIME: a property of the machine, like its id
    RUNTIME = runtimes.runtime_from_env()
except (study_config.ConfigError, runtimes.RuntimeSetupError) as error:
    sys.exit(f"cellbench: {error}")
CELLS = STUDY["cells"]
# Images the cells run, saved for cluster nodes that lack them when the study (profiles/slurm)
# asks: build-image saves those it builds, the run's start those built before.
ARCHIVED = (
    sorted({c["image"] for c in CELLS.values()}) if config.get("image_archives") else []
)
os.environ[runtimes.ARCHIVES_ENV] = ",".join(ARCHIVED)
# The tables depend on the study through this file, rewritten only when its content changes:
# switching or editing the study rebuilds them even without Snakemake's metadata.
study_config.write_study_record(paths.study_file(), config, STUDY)


# On a cluster only cells are jobs; images, models and tables are made where snakemake runs.
localrules:
    build_image,
    prepare_model,
    aggregate,
    report,
    archive,
    all,


include: "workflow/rules/images.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/cells.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/archive.smk"
include: "workflow/rules/report_html.smk"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
        rules.report.output,


# Containers of runs here whose runner died (kill -9, reboot, lost node) are removed first;
# images built before this run get their archive now, before any cell needs it on a node.
onstart:
    lifecycle.clean_on_start(str(Path.cwd()), RUNTIME)
    try:
        runtimes.save_archives(paths.image_manifest(name) for name in ARCHIVED)
    except runtimes.RuntimeSetupError as error:
        sys.exit(f"cellbench: {error}")


onsuccess:
    print(
        f"\ncellbench: tables are in {paths.tables_dir()}/ "
        f"({paths.summary_markdown().name} to read, {paths.summary_csv().name} for a spreadsheet); "
        f"every row with provenance: {paths.summary()}"
    )
