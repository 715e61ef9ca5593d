"""The doctor: find the batch-size pitfalls of seed 002 before they cost a training run.

Three entry points share one rule set:

* :func:`check_config` - a YAML/JSON/TOML training config, or a ``plan.json`` written
  by ``batchpilot plan`` (the ``batchpilot doctor FILE`` command);
* :func:`check` - live objects: model, optimizer, scheduler, data loader, EMA;
* :func:`diagnose` - an already validated :class:`DoctorConfig`.

Each returns a list of :class:`Finding` (stable code, severity, message with the
actual values, reason, source, fix). ``docs/doctor.md`` documents the schema and maps
every code to the pitfall or red flag it covers.
"""

from batchpilot.doctor.catalog import RULES, Rule
from batchpilot.doctor.diagnose import check_config, diagnose
from batchpilot.doctor.findings import SEVERITIES, Finding, exit_code, report_dict
from batchpilot.doctor.live import check, inspect_objects
from batchpilot.doctor.load import load_config
from batchpilot.doctor.schema import FIELDS, DoctorConfig, parse_config

__all__ = [
    "FIELDS", "RULES", "SEVERITIES", "DoctorConfig", "Finding", "Rule", "check", "check_config", "diagnose",
    "exit_code", "inspect_objects", "load_config", "parse_config", "report_dict",
]
