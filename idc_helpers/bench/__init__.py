"""Benchmarks (not tests): ``python -m idc_helpers.bench <name> [options]``.

Each benchmark is a module of this package with ``main(argv) -> int``; :data:`BENCHMARKS` maps the command-line
name to the module. Results are printed as Markdown tables that name the machine they ran on.
"""

# name -> module with main(argv: list[str] | None) -> int; add new benchmarks here.
BENCHMARKS: dict[str, str] = {
    "load": "idc_helpers.bench.load",
    "quality": "idc_helpers.bench.quality",
    "speed": "idc_helpers.bench.speed",
}
