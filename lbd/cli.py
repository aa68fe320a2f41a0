"""argv → command. The only module that decides the process exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

from lbd import __version__
from lbd.config import Config, ConfigError, listeners_of, load_text
from lbd.config.kubesource import kubernetes_arguments
from lbd.config.loader import LoadOptions
from lbd.config.yamlfile import read_config_file
from lbd.net.loops import LOOP_FACTORIES, LoopName
from lbd.observability.logging import LOG_LEVELS, LogFormat, configure_logging

if TYPE_CHECKING:
    from lbd.admin.client import AdminTarget

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_START = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbd", description="A userspace L4 load balancer for Kubernetes-style Services."
    )
    parser.add_argument("--version", action="version", version=f"lbd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_runtime_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--loop", choices=list(LOOP_FACTORIES), default="uvloop")
        sub.add_argument("--log-format", choices=get_args(LogFormat), default="auto")
        sub.add_argument("--log-level", choices=LOG_LEVELS, default="info")

    def with_node_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--node-name",
            default=os.environ.get("NODE_NAME"),
            help="this node's name (nodeName of local endpoints); default: $NODE_NAME, then "
            "node.name, then the host name",
        )
        sub.add_argument(
            "--proxy-name",
            default=None,
            help="serve services labelled service.kubernetes.io/service-proxy-name=NAME "
            "(default: node.proxyName; unlabelled services are always served)",
        )

    run = commands.add_parser("run", help="serve the services of a config file")
    run.add_argument("config", nargs="?", help="lbd/v1 config or manifests (or --kubernetes)")
    with_node_options(run)
    kubernetes_arguments(run)
    run.add_argument("--pid-file", help="write the process id here (for `lbd reload`)")
    run.add_argument(
        "--no-watch", action="store_true", help="reload only on SIGHUP, not when the file changes"
    )
    run.add_argument(
        "--restart-socket",
        metavar="PATH",
        help="listen here for `lbd restart` (default with --pid-file: PID_FILE.restart)",
    )
    run.add_argument(
        "--takeover",
        metavar="PATH",
        help="take the listening sockets of the lbd whose restart socket is PATH, then serve",
    )
    run.add_argument(
        "--workers",
        metavar="N",
        help="worker processes (a number or 'auto': one per CPU); overrides the config's workers",
    )
    with_runtime_options(run)

    check = commands.add_parser("check", help="validate a config file without binding anything")
    check.add_argument("config", help="path to the lbd/v1 YAML config or Kubernetes manifests")
    with_node_options(check)

    convert = commands.add_parser(
        "convert", help="print the lbd/v1 config equivalent to Kubernetes manifests"
    )
    convert.add_argument("config", help="Services and EndpointSlices (kubectl get -o yaml)")
    with_node_options(convert)
    check.add_argument(
        "--diff", metavar="NEW", help="also print what reloading from CONFIG to NEW would do"
    )

    reload = commands.add_parser("reload", help="ask a running lbd to reload its config (SIGHUP)")
    reload.add_argument("--pid-file", required=True, help="the file `lbd run --pid-file` wrote")

    restart = commands.add_parser(
        "restart",
        help="replace a running lbd by a new process without refusing a connection (SIGUSR2)",
    )
    restart.add_argument("--pid-file", required=True, help="the file `lbd run --pid-file` wrote")

    demo = commands.add_parser(
        "demo", help="start demo backends and services on 127.x and show how each strategy balances"
    )
    demo.add_argument("--connections", type=int, default=300, help="connections per strategy")
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit after the distribution table instead of staying up",
    )
    with_runtime_options(demo)

    def with_admin_target(sub: argparse.ArgumentParser) -> None:
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--admin", metavar="HOST:PORT", help="default: 127.0.0.1:9180")
        where.add_argument("--socket", metavar="PATH", help="the admin unix socket")
        where.add_argument("--config", metavar="FILE", help="use the admin section of this config")

    status = commands.add_parser(
        "status", help="services, listeners and endpoints of a running lbd"
    )
    with_admin_target(status)
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.add_argument("--count", type=int, default=0, help="with --watch: stop after N tables")
    status.add_argument("--json", action="store_true", help="print the /services JSON")

    explain = commands.add_parser(
        "explain", help="which endpoints a connection may go to, and why not the others"
    )
    explain.add_argument("service", help="NAMESPACE/NAME (or NAME in default)")
    explain.add_argument("--port", help="port name or number; needed when the service has several")
    explain.add_argument("--client", help="the client's IP address")
    explain.add_argument(
        "--kind",
        choices=("clusterIP", "externalIP", "nodePort", "loadBalancerIP"),
        default="clusterIP",
        help="the listener the connection arrives on (traffic policies, source ranges)",
    )
    explain.add_argument("--json", action="store_true", help="print the /explain JSON")
    with_admin_target(explain)

    endpoint = commands.add_parser(
        "endpoint",
        help="drain, enable or re-weight an endpoint of a running lbd (admin API, POST)",
        description="HAProxy's 'set server ... state drain | weight' for lbd: a runtime override "
        "that a reload changing the endpoint clears. Needs the admin token (--token-file, or "
        "admin.tokenFile of --config), or the admin unix socket (--socket).",
    )
    endpoint.add_argument("action", choices=("drain", "enable", "weight"))
    endpoint.add_argument("service", help="NAMESPACE/NAME (or NAME in default)")
    endpoint.add_argument("endpoint", help="ADDRESS, or ADDRESS:PORT for one of its ports")
    endpoint.add_argument(
        "weight", nargs="?", help="weight only: 0-1000000, or 'config' to drop the override"
    )
    endpoint.add_argument("--port", help="one port of the service (default: every port)")
    endpoint.add_argument("--token-file", metavar="FILE", help="the admin bearer token")
    endpoint.add_argument("--json", action="store_true", help="print the admin API's JSON")
    with_admin_target(endpoint)
    from lbd.admin.fault_cli import add_fault_parser  # argparse only: nothing heavy

    add_fault_parser(commands, with_admin_target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "endpoint" and (args.weight is None) == (args.action == "weight"):
        parser.error("a weight is given with 'weight', and only with it")
    if args.command == "run" and args.config is None and not args.kubernetes:
        parser.error("give a config file, or --kubernetes")
    options = LoadOptions(getattr(args, "node_name", None), getattr(args, "proxy_name", None))
    if args.command == "convert":
        return convert(args.config, options)
    if args.command == "check":
        if args.diff is not None:
            return check_diff(args.config, args.diff, options)
        return check(args.config, options)
    if args.command == "reload":
        return send_signal(args.pid_file, signal.SIGHUP, "reload")
    if args.command == "restart":
        return send_signal(args.pid_file, signal.SIGUSR2, "restart")
    if args.command in ("status", "explain", "endpoint", "fault"):
        from lbd.admin.commands import admin_command

        target = _admin_target(args)
        if target is None:
            return EXIT_CONFIG
        return admin_command(args, target)
    configure_logging(args.log_format, args.log_level)
    if args.command == "run":
        return run(args, options)
    return demo(args.loop, args.connections, args.once)


def _load(path: str, options: LoadOptions | None = None) -> Config | None:
    try:
        return load_text(read_config_file(path), path, options)
    except ConfigError as error:
        _print_problems(path, error)
        return None


def _print_problems(label: str, error: ConfigError) -> int:
    heading = f"{label}: {_plural(len(error.problems), 'problem')}"
    print(heading, *map(str, error.problems), sep="\n", file=sys.stderr)
    return EXIT_CONFIG


def _admin_target(args: argparse.Namespace) -> AdminTarget | None:
    from lbd.admin.client import AdminTarget

    if args.socket:
        return AdminTarget(socket=args.socket)
    if args.config:
        config = _load(args.config)
        if config is None:
            return None
        if getattr(args, "token_file", "") is None:  # endpoint, fault: the config's token file
            args.token_file = config.admin.token_file
        return AdminTarget.of(config.admin)
    return AdminTarget(address=args.admin or "127.0.0.1:9180")


def convert(path: str, options: LoadOptions) -> int:
    """Validate as ``check`` does, then print the effective lbd/v1 config (YAML)."""
    import yaml

    from lbd.config.render import render_config

    config = _load(path, options)
    if config is None:
        return EXIT_CONFIG
    document = render_config(config)
    for skipped in config.skipped:
        print(f"# skipped {skipped.service}: {skipped.reason}")
    print(yaml.safe_dump(document, sort_keys=False, default_flow_style=None), end="")
    return EXIT_OK


def check(path: str, options: LoadOptions | None = None) -> int:
    config = _load(path, options)
    if config is None:
        return EXIT_CONFIG
    ports = sum(len(s.ports) for s in config.services)
    listeners = sum(len(listeners_of(s, config.node)) for s in config.services)
    endpoints = sum(len(s.endpoints) for s in config.services)
    counts = ", ".join(
        _plural(n, word)
        for n, word in (
            (len(config.services), "service"),
            (ports, "port"),
            (listeners, "listener"),
            (endpoints, "endpoint"),
        )
    )
    skipped = f"; {_plural(len(config.skipped), 'service')} skipped" if config.skipped else ""
    print(f"{path}: ok: {counts} (node {config.node.name}){skipped}")
    for warning in config.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_diff(running: str, new: str, options: LoadOptions | None = None) -> int:
    from lbd.config.diff import diff_configs

    old_config, new_config = _load(running, options), _load(new, options)
    if old_config is None or new_config is None:
        return EXIT_CONFIG
    diff = diff_configs(old_config, new_config)
    if diff.empty:
        print(f"{new}: ok: a reload from {running} would change nothing")
        return EXIT_OK
    for line in diff.describe():
        print(line)
    summary = diff.summary()
    print(
        f"{new}: ok: {_plural(summary['listeners_added'], 'listener')} added, "
        f"{summary['listeners_removed']} removed, {summary['listeners_repointed']} re-pointed; "
        f"{_plural(summary['endpoints_added'], 'endpoint')} added, "
        f"{summary['endpoints_draining']} would start draining"
    )
    return EXIT_OK


def send_signal(pid_file: str, signum: signal.Signals, command: str) -> int:
    """Signal the lbd the pid file names, once it is known to be a running ``lbd run``."""
    from lbd.process.pidfile import PidFileError, running_lbd

    try:
        pid = running_lbd(pid_file)
        os.kill(pid, signum)
    except (OSError, PidFileError) as error:
        print(f"lbd {command}: cannot signal the process in {pid_file}: {error}", file=sys.stderr)
        return EXIT_START
    print(f"lbd {command}: sent {signum.name} to {pid}")
    return EXIT_OK


def run(args: argparse.Namespace, options: LoadOptions | None = None) -> int:
    from lbd.admin.server import AdminError
    from lbd.config.admin import workers_count
    from lbd.process.handoff import HandoffError
    from lbd.process.kube_mode import SourceError, kubernetes_mode
    from lbd.process.pidfile import defer_signals, remove_pid_file, write_pid_file
    from lbd.process.supervisor import StartError
    from lbd.runtime.runtime import ListenerError

    path, loop, pid_file = args.config, args.loop, args.pid_file
    try:  # a file, or lbd run --kubernetes, or a file with source: kubernetes
        data = read_config_file(path) if path is not None else None
        loaded = load_text(data, path, options) if data is not None else None
        config, data, args.source = kubernetes_mode(args, loaded, data, options)
    except ConfigError as error:
        return _print_problems(path or "lbd run --kubernetes", error)
    workers = config.workers
    if args.workers is not None:
        try:
            workers = workers_count(args.workers if args.workers == "auto" else int(args.workers))
        except ValueError as error:  # FieldError is one
            print(f"lbd run: --workers: {error}", file=sys.stderr)
            return EXIT_USAGE
    # Until their handlers exist, SIGHUP and SIGUSR2 (``lbd reload``/``restart``, which find us
    # through the pid file) wait rather than end the process.
    defer_signals()
    if pid_file:
        try:
            write_pid_file(pid_file)
        except OSError as error:
            print(f"lbd run: cannot write the pid file {pid_file}: {error}", file=sys.stderr)
            return EXIT_START
    try:
        with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop]) as runner:
            return runner.run(_serve(args, config, data, workers, options))
    except (ListenerError, AdminError, StartError, HandoffError, SourceError) as error:
        print(f"{path or 'lbd run --kubernetes'}: {error}", file=sys.stderr)
        return EXIT_START
    finally:
        if pid_file:
            remove_pid_file(pid_file)


async def _serve(
    args: argparse.Namespace,
    config: Config,
    data: bytes,
    workers: int,
    options: LoadOptions | None,
) -> int:
    from lbd.process.handoff import Restart, take_over

    kubernetes = args.source  # lbd run --kubernetes: opened by serve()
    source, watch = (args.config or "<kubernetes>", data), not args.no_watch and args.config
    restart_path = args.restart_socket or (f"{args.pid_file}.restart" if args.pid_file else None)
    takeover = await take_over(args.takeover) if args.takeover else None
    restart = Restart(restart_path, takeover, pid_file=args.pid_file)
    try:
        if workers == 1:
            from lbd.process.worker import serve

            more: dict[str, Any] = {"restart": restart, "kubernetes": kubernetes}
            return await serve(config, source=source, watch=watch, options=options, **more)
        from lbd.process.supervisor import Supervisor
        from lbd.process.supervisor_admin import serve_supervised

        worker_args = [f"--loop={args.loop}", f"--log-format={args.log_format}"]
        worker_args.append(f"--log-level={args.log_level}")
        supervisor = Supervisor(
            config,
            source,
            workers=workers,
            worker_args=worker_args,
            inherited=restart.inherited,
            options=options,
        )
        return await serve_supervised(
            supervisor, watch=watch, restart=restart, kubernetes=kubernetes
        )
    finally:
        restart.close()


def demo(loop: LoopName, connections: int, once: bool) -> int:
    from lbd.demo import run_demo
    from lbd.runtime.runtime import ListenerError

    try:
        with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop]) as runner:
            return runner.run(run_demo(connections, once))
    except ListenerError as error:
        print(f"lbd demo: {error}", file=sys.stderr)
        return EXIT_START
