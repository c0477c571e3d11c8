"""Build a program's filesystem inside its namespaces, drop privileges and exec it: the inside half of the sandbox.

stages.envs.sandbox runs this file as `python -I -S isolation.py SCRATCH STATUS_FD UID PROCESSES PYTHON PREFIX...`
under `unshare --mount --pid --net --ipc --kill-child` (with `--user --map-root-user` when n3 is not root). It starts
as process 1 of the new PID namespace, privileged (root, or root of the new user namespace), and then:

- mounts a fresh tmpfs on SCRATCH (a directory the runner made, holding main.py) as the program's root, and mirrors
  into it, read-only, /usr, /bin, /sbin, /lib*, /etc and the interpreter's PREFIXes (at the same paths); a /dev with
  null, zero, random and urandom; a fresh /proc for the PID namespace; and a fresh tmpfs /tmp holding main.py, the
  working directory and the only writable place;
- chroots there, starts a session, caps processes with RLIMIT_NPROC and gives up every privilege: as root it switches
  to UID (an unprivileged uid of the program's own, which is what makes RLIMIT_NPROC count: the kernel exempts uid
  0 from it); in a user namespace (UID 0) it stays root there, but exec grants it no capabilities;
- writes "ok" to STATUS_FD and execs `PYTHON -I main.py` in its place, so the program is process 1: when it exits
  or is killed, the kernel kills whatever is left in the namespace. STATUS_FD closes at that exec, so the program
  cannot write to it; a failure before it writes the reason there instead, which is how the runner tells a sandbox
  that could not start from a program that failed.

Standard library only: it runs in a bare interpreter, apart from n3.
"""

import ctypes
import os
import resource
import signal
import sys

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 0x2, 0x4, 0x8, 0x1000, 0x4000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442
"""mount_setattr(2), Linux 5.12+: the same number on every architecture (it came after the tables were unified)."""
PR_SET_PDEATHSIG, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 28, 38
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 0x1, 0x2

SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "random", "urandom")
SCRATCH_OPTIONS = "size=64m,nr_inodes=4096,mode=0700"
"""The program's /tmp: the file-size rlimit caps each file, these the whole directory."""

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)),
           f"mount {target}")


def _set_attributes(path: str, set_: int = 0, clear: int = 0, recursive: bool = False) -> None:
    """mount_setattr: unlike a remount, it changes only the given flags, so the locked ones need not be repeated."""
    attr = MountAttr(set_, clear, 0, 0)
    _check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), os.fsencode(path),
                        ctypes.c_long(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                        ctypes.c_long(ctypes.sizeof(attr))), f"mount_setattr {path}")


def _prctl(option: int, value: int) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _places(prefixes: list[str]) -> list[str]:
    """The host paths the program sees: the system directories and the interpreter's prefixes, each also as its
    real path (a prefix may be a symlink), without any that lies inside another (sorted: parents first)."""
    places = sorted({*SYSTEM, *prefixes, *map(os.path.realpath, prefixes)})
    return [p for i, p in enumerate(places) if not any(p.startswith(q.rstrip("/") + "/") for q in places[:i])]


def _mirror(path: str, root: str) -> None:
    """Show host `path` at the same place under `root`: a symlink as the same symlink, a directory by a recursive
    bind (recursive, because a user namespace may not bind a directory without the mounts inside it)."""
    target = root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
        _mount(path, target, flags=MS_BIND | MS_REC)


def build(root: str, program: bytes, uid: int, prefixes: list[str]) -> None:
    """The program's filesystem under `root` (see the module docstring), all of it read-only but /tmp."""
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    places = _places(prefixes)
    # A prefix under /tmp (a virtual environment made there, as CI makes one) is mirrored into the fresh /tmp
    # once that exists, read-only like the rest.
    in_tmp = [place for place in places if place.startswith("/tmp/")]
    for place in places:
        if place not in in_tmp:
            _mirror(place, root)
    os.mkdir(f"{root}/dev")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "x").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", flags=MS_BIND)
    os.mkdir(f"{root}/proc")
    _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(f"{root}/tmp")
    _mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{SCRATCH_OPTIONS},uid={uid},gid={uid}")
    with open(f"{root}/tmp/main.py", "xb") as file:
        file.write(program)
    for place in in_tmp:
        _mirror(place, root)
    _set_attributes(root, set_=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, recursive=True)
    _set_attributes(f"{root}/tmp", clear=MOUNT_ATTR_RDONLY)


def drop_privileges(uid: int, processes: int) -> None:
    """Give up what the namespaces granted; from here the program can change nothing outside /tmp."""
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root: drops every capability
    else:  # root in a user namespace: keep the uid (the only one mapped), but exec grants root no capabilities
        _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # nor do set-uid files or file capabilities
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # unshare --kill-child set this; a change of uid clears it


def main(scratch: str, status: int, uid: int, processes: int, python: str, prefixes: list[str]) -> None:
    with open(f"{scratch}/main.py", "rb") as file:
        program = file.read()
    build(scratch, program, uid, prefixes)
    os.chroot(scratch)  # enough without capabilities: only a privileged process can leave a chroot
    os.chdir("/tmp")
    os.setsid()  # its own process group: killpg(0) from the program reaches only the namespace
    drop_privileges(uid, processes)
    os.write(status, b"ok")
    os.execve(python, [python, "-I", "main.py"], {})


if __name__ == "__main__":
    status_fd = int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    try:
        main(sys.argv[1], status_fd, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    except BaseException as e:  # whatever stopped the setup, the runner must hear why
        os.write(status_fd, f"{type(e).__name__}: {e}".encode())
        os._exit(1)
