"""flowhand side by side with `prefect worker start`: one machine, one run, one table.

Run it through `bench/run`, which installs what this needs first (see docs/bench.md):

    bench/run [--quick] [--only burst,wide,containers,cold,steady,flow,flow-warm,flow-idle,scale]
              [--size NAME=N[xS]]

What happens, once per run: a private PostgreSQL cluster and a Prefect 3.8.8 server backed by it
start on free loopback ports. Then, for each workload, first Prefect's worker and then flowhand
each get a fresh work pool (created with Prefect's own default base job template for its type)
and an identical deployment; the bench creates the workload's runs, waits until every run is
final, stops the worker with SIGTERM and reads every run's state history from the API. A sampler
thread reads the worker process's CPU time and RSS from /proc (the worker itself, not its
children) every 0.25 s, and once a second the proportional set size (PSS: shared pages counted
once) of the worker with flowhand's warm helpers, and of its whole tree, runs included.

The package imports nothing from Prefect or flowhand (but for the two cost scripts,
`output_cost` and `takeover_cost`, which run in flowhand's `.venv`): it drives both through
their command lines and the REST API, with httpx, and draws the chart with matplotlib.

Modules: `workloads` (what runs), `runner` (one workload under one worker), `worker` (the
worker process), `sampler` (/proc reads), `profiler` (py-spy), `server` (Prefect server and API
client), `machine` (the host), `costs` (server CPU per request), `analysis` (figures from
histories and samples), `report` and `chart` (the output), `cli` (the command line).
"""
