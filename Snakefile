# nsclean: remove correlated read noise from JWST NIRSpec count-rate images,
# from a program ID to a QA report.  User documentation: docs/workflow.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/clean.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/stage2.smk"


rule all:
    default_target: True
    input:
        final_targets(),
