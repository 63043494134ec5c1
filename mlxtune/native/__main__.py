"""python -m mlxtune.native [--force]: build mlxtune's CPU kernels for this machine."""

import sys

import mlxtune  # noqa: F401  (the BLAS and allocator set-up, before mlx.core)
from mlxtune import native


def main() -> int:
    force = "--force" in sys.argv[1:]
    reason = native._unavailable()
    if reason:
        print(f"mlxtune native kernels: not built: {reason}; MLX's own ops are used")
        return 0  # nothing to build on this platform is not an error
    try:
        path = native.build(force=force, log=print)
    except native.BuildError as e:
        print(f"mlxtune native kernels: build failed: {e}", file=sys.stderr)
        return 1
    module = native.load()
    if module is None:
        print(f"mlxtune native kernels: built at {path} but not usable: "
              f"{native.state['reason']}", file=sys.stderr)
        return 1
    print(f"mlxtune native kernels: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
