# cellbench: build engine images, prepare models, run every cell of a study in its own
# container, aggregate Parquet metrics into tables. The logic lives in workflow/cellbench/.
import json
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

ROOT = Path(workflow.basedir)
sys.path.insert(0, str(ROOT / "workflow"))
from cellbench import (
    config as study_config,
    images,
    lifecycle,
    machines,
    paths,
    provenance,
)  # noqa: E402
from cellbench import scheduling  # noqa: E402

DEFAULT_STUDY = ROOT / "config" / "config.yaml"

# A --configfile replaces the default study instead of being merged into it: merging would
# leak the CPU study's defaults and cells into a GPU study.
if not workflow.overwrite_configfiles:
    config.update(study_config.load_study(DEFAULT_STUDY))
try:
    # The files again, with cellbench's loader: Snakemake's drops duplicate keys and evaluates
    # (then removes) `__use_yte__`; what it made is checked by resolve().
    study_config.check_study_files(workflow.overwrite_configfiles)
    STUDY = study_config.resolve(config)
    JOBS = {
        cell_id: scheduling.job_resources(cell)
        for cell_id, cell in STUDY["cells"].items()
    }
    ROUND_PRIORITY = scheduling.round_priorities(STUDY["cells"])
except study_config.ConfigError as error:
    sys.exit(f"cellbench: {error}")
CELLS = STUDY["cells"]
MACHINE_ID = provenance.machine_id(config.get("machine_id"))


# On a cluster only cells are jobs; images, models and tables are made where snakemake runs.
localrules:
    build_image,
    prepare_model,
    aggregate,
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


# Containers of runs here whose runner died (kill -9, reboot, lost node) are removed first.
onstart:
    lifecycle.clean_on_start(str(Path.cwd()))


onsuccess:
    print(
        f"\ncellbench: tables are in {paths.tables_dir()}/ "
        f"({paths.summary_markdown().name} to read, {paths.summary_csv().name} for a spreadsheet); "
        f"every row with provenance: {paths.summary()}"
    )
