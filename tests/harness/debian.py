"""Debian roots made with debootstrap: for the Ansible chroot test, the stand-in images and the Pi.

A root is debootstrapped once per (suite, architecture, variant, packages) and kept as a tarball
in ``$TEMPMON_DEBOOTSTRAP_CACHE`` (default ``/var/cache/tempmon-tests/``); every user extracts a
fresh copy. A root that needs more packages is made by running a recipe (a shell script) inside
a copy of the base root, through chroot, with this host's network: containers built from it
need no network of their own. Everything here needs root (debootstrap, chroot, mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.harness.procs import host_lock

__all__ = [
    "CACHE_DIR",
    "cache_lock",
    "debian_mirror",
    "debian_root",
    "debootstrap_tarball",
    "dpkg_architecture",
    "host_suite",
    "in_root",
    "mounts_under",
    "recipe_tarball",
]

CACHE_DIR = Path(os.environ.get("TEMPMON_DEBOOTSTRAP_CACHE", "/var/cache/tempmon-tests"))
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def host_suite() -> str | None:
    """This host's Debian suite (bookworm, trixie...), or None on another distribution.

    ``TEMPMON_DEBOOTSTRAP_SUITE`` overrides it, e.g. to try the other Debian release.
    """
    if os.environ.get("TEMPMON_DEBOOTSTRAP_SUITE"):
        return os.environ["TEMPMON_DEBOOTSTRAP_SUITE"]
    release = Path("/etc/os-release").read_text(encoding="utf-8")
    fields = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', release, re.M))
    if fields.get("ID") != "debian" or not fields.get("VERSION_CODENAME"):
        return None
    return fields["VERSION_CODENAME"]


def dpkg_architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def debian_mirror() -> str:
    """The mirror this host's apt uses (it is reachable), unless TEMPMON_DEBIAN_MIRROR says."""
    if os.environ.get("TEMPMON_DEBIAN_MIRROR"):
        return os.environ["TEMPMON_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if source.suffix not in {".list", ".sources"} or not source.is_file():
            continue
        text = source.read_text(encoding="utf-8", errors="replace")
        match = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)/?\s", text, re.M
        )
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def cache_lock(entry: str) -> Iterator[None]:
    """Held while one cache entry is made: a second process (an xdist worker) that wants the
    same entry waits for it instead of building it too, then finds it made."""
    with host_lock(entry, CACHE_DIR):
        yield


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _publish(work: Path, root: Path, tarball: Path, *, compress: bool) -> None:
    """Tar ``root`` into the cache atomically (a partial tarball is never seen)."""
    partial = work / tarball.name
    subprocess.run(
        [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "-C",
            str(root),
            "-czf" if compress else "-cf",
            str(partial),
            ".",
        ],
        check=True,
    )
    partial.replace(tarball)


def debootstrap_tarball(suite: str, arch: str, include: str, *, variant: str = "minbase") -> Path:
    """A freshly debootstrapped root as a tarball, made once and kept in the cache directory.

    Raises:
        RuntimeError: debootstrap is missing or failed (its log's tail is in the message).
    """
    key = hashlib.sha256(f"{suite} {arch} {variant} {include}".encode()).hexdigest()
    tarball = CACHE_DIR / f"debian-{suite}-{arch}-{variant}-{key[:12]}.tar.gz"
    if tarball.is_file():
        return tarball
    with cache_lock(tarball.name):
        if not tarball.is_file():
            _debootstrap(suite, arch, include, variant, tarball)
    return tarball


def _debootstrap(suite: str, arch: str, include: str, variant: str, tarball: Path) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).is_file():
        raise RuntimeError("debootstrap is not installed: apt-get install debootstrap")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
    try:
        root = work / "root"
        result = subprocess.run(
            [
                debootstrap,
                f"--variant={variant}",
                *([f"--include={include}"] if include else []),
                f"--arch={arch}",
                suite,
                str(root),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=1500,
            check=False,
        )
        if result.returncode != 0:
            log = root / "debootstrap" / "debootstrap.log"
            detail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}{detail}")
        _publish(work, root, tarball, compress=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mounts_under(path: Path) -> list[str]:
    """The mount points at or below ``path``, as this process sees them."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            found.append(mount_point)
    return found


@contextlib.contextmanager
def debian_root(tarball: Path, root: Path, *, keep: bool = False) -> Iterator[Path]:
    """A fresh copy of a cached root with /proc and /sys mounted; unmounted (and removed) after.

    /dev is not mounted: debootstrap made the device nodes apt and pip need (null, urandom...).
    Packages installed inside cannot start services (policy-rc.d), and the root resolves names
    and trusts certificates as this host does, so apt and pip inside reach what the host does.

    Raises:
        RuntimeError: a mount could not be undone; the root is then left in place.
    """
    root.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)], check=True)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    certs = root / "etc/ssl/certs"
    if certs.is_dir():
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", certs / "ca-certificates.crt")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
    policy.chmod(0o755)
    mounted: list[Path] = []
    try:
        for fstype, target in (("proc", "proc"), ("sysfs", "sys")):
            subprocess.run(
                ["mount", "-t", fstype, "-o", "ro,nosuid,nodev,noexec", fstype, str(root / target)],
                check=True,
            )
            mounted.append(root / target)
        yield root
    finally:
        for mount_point in reversed(mounted):
            if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mount_point)], check=False)
        left = mounts_under(root)
        if left:
            # Never delete through a mount point.
            raise RuntimeError(f"could not unmount {left}; {root} is left in place")
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def in_root(
    root: Path,
    *cmd: str,
    userspec: str | None = None,
    check: bool = True,
    timeout: float = 300,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` inside ``root`` through chroot.

    Raises:
        AssertionError: ``check`` is set and the command failed (its output is the message).
    """
    prefix = ["chroot", *([f"--userspec={userspec}"] if userspec else []), str(root)]
    result = subprocess.run(
        [*prefix, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_ENV,
        input=input_text,
    )
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} in {root}:\n{result.stdout}{result.stderr}"
    return result


def recipe_tarball(name: str, base: Path, recipe: Path, *, timeout: float = 1500) -> Path:
    """The base root with ``recipe`` (a shell script) run inside it, cached as a tarball.

    The cache key is the base tarball's name and the recipe's text, so editing a recipe makes a
    new root. The recipe runs as root in the chroot with this host's network; it should install
    with ``apt-get install --no-install-recommends`` and clean apt's lists and cache.

    Raises:
        RuntimeError: the recipe failed; its output's tail is in the message.
    """
    text = recipe.read_text(encoding="utf-8")
    tarball = CACHE_DIR / f"root-{name}-{_key(base.name, text)}.tar"
    if tarball.is_file():
        return tarball
    with cache_lock(tarball.name):
        if not tarball.is_file():
            _run_recipe(name, recipe, base, tarball, timeout=timeout)
    return tarball


def _run_recipe(name: str, recipe: Path, base: Path, tarball: Path, *, timeout: float) -> None:
    text = recipe.read_text(encoding="utf-8")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"recipe-{name}-", dir=CACHE_DIR))
    try:
        with debian_root(base, work / "root", keep=True) as root:
            result = in_root(
                root, "/bin/sh", "-eux", "-s", check=False, timeout=timeout, input_text=text
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"recipe {recipe} failed ({result.returncode}):\n"
                    f"{(result.stdout + result.stderr)[-4000:]}"
                )
            # The host's resolver was copied in for apt; a container gets its own.
            (root / "etc/resolv.conf").unlink(missing_ok=True)
        _publish(work, work / "root", tarball, compress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
