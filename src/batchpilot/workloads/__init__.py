"""Built-in workloads. Importing this package registers them."""

from batchpilot.workloads import charlm, digits, mnist1d  # noqa: F401
