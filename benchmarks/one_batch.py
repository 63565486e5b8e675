"""`python -m sglang.bench_one_batch` with SGLang's plugins loaded first (the stock module does not load them),
so `--enable-asynctls` and the `--asynctls-*` flags parse. Same arguments as the stock tool."""

from sglang.srt.plugins import load_plugins

load_plugins()

from sglang.benchmark.one_batch import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main()
