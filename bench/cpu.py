"""CPU time of a server process (and its children) from /proc.

utime + stime of a process cover all its threads; cutime + cstime cover
children it has waited for; live children (nginx workers, helper processes)
are found through their parent pid (one scan of /proc: this kernel has no
/proc/PID/task/TID/children) and added. Reading this before and after a
transfer gives the CPU seconds the server spent on it.
"""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may contain spaces and parentheses.
    return data[data.rindex(b")") + 2:].split()


def _ticks(fields, children=True):
    # After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16)
    # cstime(17), numbered as in proc(5); index = number - 3.
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t


def _all_processes():
    """Map pid -> (ppid, ticks) for every process now alive."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _fields(int(name))
            procs[int(name)] = (int(fields[1]), _ticks(fields))
        except (OSError, ValueError, IndexError):
            pass  # exited meanwhile
    return procs


def process_tree_seconds(pid):
    """CPU seconds (user + system) of pid and all its live descendants.

    Waited-for children are counted by the parent's cutime/cstime.
    """
    procs = _all_processes()
    kids = {}
    for p, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(p)
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
            todo.extend(kids.get(p, ()))
    return total / CLK_TCK
