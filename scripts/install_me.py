"""Build (once per machine) and install MinkowskiEngine 0.5.4 with ctsparse's patch set.

Run with the Python of the target environment (torch must already be installed there):

    python scripts/install_me.py [--force-rebuild] [--cuda | --cpu]

Steps: look for a cached wheel whose key matches (Python tag, torch version, CPU/CUDA, patch set);
if there is none, fetch the 0.5.4 sdist from the package index pip is configured to use, apply
scripts/me-patches/*.patch (plus me-patches/cuda/*.patch for a CUDA build), build a wheel with
`pip wheel --no-build-isolation`, store it in the cache, then `pip install` it.

Why not `pip download`/`pip install MinkowskiEngine`: for an sdist pip runs setup.py to read the
metadata, and 0.5.4's setup.py crashes there on current setuptools. So we read pip's own index
configuration and speak the PEP 503 "simple" API ourselves; the only host named is pip's default.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT, VERSION = "MinkowskiEngine", "0.5.4"
PIP_DEFAULT_INDEX = "https://pypi.org/simple"
PATCH_DIR = Path(__file__).resolve().parent / "me-patches"


def log(msg: str) -> None:
    print(f"[install_me] {msg}", flush=True)


def pip(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, check=not capture, capture_output=capture, text=True)
    return res.stdout if capture else ""


def configured_indexes() -> list[str]:
    """Index URLs in pip's order: index-url (or pip's default), then every extra-index-url."""
    main = os.environ.get("PIP_INDEX_URL")
    extras = os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    for line in pip("config", "list", capture=True).splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if name == "index-url" and main is None:
            main = value
        elif name == "extra-index-url":
            extras += value.split()
    return list(dict.fromkeys([main or PIP_DEFAULT_INDEX, *extras]))


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def fetch_sdist(dest: Path) -> Path:
    wanted = f"{PROJECT}-{VERSION}.tar.gz".lower()
    errors = []
    for index in configured_indexes():
        page = f"{index.rstrip('/')}/{PROJECT.lower()}/"
        try:
            with urllib.request.urlopen(page, timeout=60) as resp:
                body = resp.read().decode("utf-8", "replace")
        except Exception as exc:  # this index is unreachable or lacks the project: try the next
            errors.append(f"{page}: {exc}")
            continue
        links = _Links()
        links.feed(body)
        for href in links.hrefs:
            url, _, fragment = href.partition("#")
            if urllib.parse.unquote(url.rsplit("/", 1)[-1]).lower() != wanted:
                continue
            url = urllib.parse.urljoin(page, url)
            log(f"downloading {url}")
            with urllib.request.urlopen(url, timeout=300) as resp:
                data = resp.read()
            if fragment.startswith("sha256=") and hashlib.sha256(data).hexdigest() != fragment[7:]:
                raise SystemExit(f"sha256 mismatch for {url}")
            target = dest / wanted
            target.write_bytes(data)
            return target
    raise SystemExit(f"{PROJECT}=={VERSION} sdist not found on pip's indexes: {'; '.join(errors)}")


def want_cuda(choice: str | None) -> bool:
    import torch

    if choice == "cpu":
        return False
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = (
        shutil.which("nvcc") is not None
        or Path(os.environ.get("CUDA_HOME", "/nonexistent"), "bin/nvcc").exists()
    )
    if choice == "cuda" and not (has_cuda_torch and has_nvcc):
        raise SystemExit("--cuda needs a CUDA build of torch and nvcc on PATH (or CUDA_HOME)")
    return has_cuda_torch and has_nvcc


def patches(cuda: bool) -> list[Path]:
    found = sorted(PATCH_DIR.glob("*.patch"))
    return found + (sorted((PATCH_DIR / "cuda").glob("*.patch")) if cuda else [])


def cache_key(cuda: bool) -> str:
    import torch

    digest = hashlib.sha256()
    for p in patches(cuda):
        digest.update(p.name.encode() + p.read_bytes())
    flavour = f"cu{torch.version.cuda}" if cuda else "cpu"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""
    digest.update(arch.encode())
    py = sysconfig.get_config_var("SOABI") or sys.version.split()[0]
    return f"{VERSION}-{py}-torch{torch.__version__}-{flavour}-{digest.hexdigest()[:12]}"


def toolkit_root() -> str | None:
    """The CUDA toolkit directory of the nvcc on PATH, as nvcc itself reports it.

    torch guesses CUDA_HOME as the parent of nvcc's directory, which is wrong when nvcc is a wrapper
    script or a symlink farm (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, without headers).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    cmd = [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
    dry = subprocess.run(cmd, check=False, capture_output=True, text=True)
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line[len("#$ TOP=") :].strip().strip('"')).resolve()
            if (top / "include" / "cuda_runtime.h").exists():
                return str(top)
    return str(Path(nvcc).resolve().parent.parent)


def cuda_env(env: dict[str, str], scratch: Path) -> dict[str, str]:
    """Point the build at the toolkit and at torch's nvidia-* wheels.

    CUDA 13 toolkits ship without cusparse.h/libcusparse; torch's nvidia-* wheels carry them, but
    only as runtime sonames (libcusparse.so.12), so `-lcusparse` needs an unversioned link name.
    """
    import site

    import torch

    if not (env.get("CUDA_HOME") or env.get("CUDA_PATH")):
        root = toolkit_root()
        if root:
            env["CUDA_HOME"] = root
    log(f"CUDA_HOME={env.get('CUDA_HOME') or env.get('CUDA_PATH')}")
    link_dir = scratch / "cuda-link-names"
    link_dir.mkdir(exist_ok=True)
    extra_inc, extra_lib = [], [str(link_dir)]
    runtime_dirs = [Path(torch.__file__).parent / "lib"]
    for sp in site.getsitepackages():
        for inc in Path(sp, "nvidia").glob("*/include"):
            extra_inc.append(str(inc))
        for lib in Path(sp, "nvidia").glob("*/lib"):
            extra_lib.append(str(lib))
            runtime_dirs.append(lib)
            for so in sorted(lib.glob("lib*.so.*")):
                name = link_dir / (so.name.split(".so.")[0] + ".so")
                if not (lib / name.name).exists() and not name.exists():
                    name.symlink_to(so)
    env["CPATH"] = os.pathsep.join([*extra_inc, env.get("CPATH", "")]).strip(os.pathsep)
    env["LIBRARY_PATH"] = os.pathsep.join([*extra_lib, env.get("LIBRARY_PATH", "")]).strip(os.pathsep)
    # Let _C*.so (installed in <platlib>/MinkowskiEngineBackend/) find torch's and the nvidia wheels'
    # libraries the way torch's own libraries do: through an $ORIGIN-relative RPATH.
    platlib = Path(sysconfig.get_paths()["platlib"]).resolve()
    rpath = [
        f"$ORIGIN/../{d.resolve().relative_to(platlib)}" if d.resolve().is_relative_to(platlib) else str(d)
        for d in runtime_dirs
    ]
    env["LDFLAGS"] = " ".join([f"-Wl,-rpath,{':'.join(rpath)}", env.get("LDFLAGS", "")]).strip()
    # CUDA 13 dropped sm_70/sm_72 (Volta); +PTX lets newer GPUs JIT the kernels.
    cuda_major = int((torch.version.cuda or "0").split(".")[0])
    env.setdefault(
        "TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;9.0+PTX" if cuda_major >= 13 else "7.0;7.5;8.0;8.6;9.0"
    )
    return env


def build_wheel(cuda: bool, out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="me-build-") as tmp:
        sdist = fetch_sdist(Path(tmp))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"{PROJECT}-{VERSION}"
        for p in patches(cuda):
            log(f"applying {p.relative_to(PATCH_DIR)}")
            subprocess.run(["patch", "-p1", "--forward", "--quiet", "-i", str(p)], cwd=src, check=True)
        env = dict(os.environ)
        flags = ["--blas=openblas"] + (["--force_cuda"] if cuda else ["--cpu_only"])
        env["MINKOWSKI_SETUP_ARGS"] = " ".join(flags)
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if cuda:
            env = cuda_env(env, Path(tmp))
        log(f"building wheel ({' '.join(flags)}, MAX_JOBS={env['MAX_JOBS']}); takes minutes")
        start = time.time()
        wheel_dir = Path(tmp) / "wheel"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-build-isolation",
                "--no-deps",
                "-w",
                str(wheel_dir),
                str(src),
            ],
            check=True,
            env=env,
        )
        log(f"built in {time.time() - start:.0f} s")
        (wheel,) = wheel_dir.glob("*.whl")
        staged = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        staged.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, staged / wheel.name)
        # rename is atomic: a concurrent or interrupted setup never sees a half-copied wheel
        staged.rename(out_dir)
    return next(out_dir.glob("*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--cuda", dest="flavour", action="store_const", const="cuda")
    group.add_argument("--cpu", dest="flavour", action="store_const", const="cpu")
    ap.add_argument("--force-rebuild", action="store_true")
    args = ap.parse_args()

    cuda = want_cuda(args.flavour)
    cache_root = Path(os.environ.get("CTSPARSE_CACHE", Path.home() / ".cache" / "ctsparse")) / "me-wheels"
    out_dir = cache_root / cache_key(cuda)
    if args.force_rebuild and out_dir.exists():
        shutil.rmtree(out_dir)
    wheels = list(out_dir.glob("*.whl")) if out_dir.exists() else []
    if wheels:
        log(f"using cached wheel {wheels[0]}")
        wheel = wheels[0]
    else:
        cache_root.mkdir(parents=True, exist_ok=True)
        wheel = build_wheel(cuda, out_dir)
    pip("install", "--no-deps", "--force-reinstall", "--quiet", str(wheel))
    log(f"installed {wheel.name} ({'CUDA' if cuda else 'CPU'} build)")


if __name__ == "__main__":
    main()
