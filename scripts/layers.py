#!/usr/bin/env python3
"""Check that ringmx's modules do not import each other in circles.

Every path into the crate in `src/` counts — `use crate::…`, `use super::…` and paths written
inline (`crate::units::Cidr`) — outside comments and `#[cfg(test)]` modules. A path names the
deepest module it reaches. Fails when any two modules reach each other, directly or through
others (a parent naming its own children is structure and does not count), and when the
top-level modules (the layers) do.

    scripts/layers.py [--print]      # --print: the layers, bottom first

`cargo modules dependencies --acyclic` (crates.io) was tried first: it checks items as well as
modules, where a method that names its own type is already a cycle, and it does not see
inline paths; this script needs nothing but Python.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
ROOT_ONLY = {"main", "fuzz_targets"}  # binaries and fuzzing glue sit above everything
PATH = re.compile(r"\b(crate|super)((?:::\w+)+)")
GROUP = re.compile(r"\buse\s+(crate|super)((?:::\w+)*)::\{([^}]*)\}", re.S)


def modules():
    """module path (tuple) -> file"""
    out = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), SRC)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"],):
                rel = []
            out[tuple(rel)] = os.path.join(root, f)
    return out


def strip(text):
    """Drop comments and the `#[cfg(test)]` module at the end of a file."""
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests\s*\{", text)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//[^\n]*", "", text)
    return text


def resolve(mods, here, kind, segs):
    base = () if kind == "crate" else here[:-1]
    path = list(base)
    best = tuple(base)
    for s in segs:
        path.append(s)
        if tuple(path) in mods:
            best = tuple(path)
        else:
            break
    return best


def edges(mods):
    out = {}
    for here, f in mods.items():
        if here and here[0] in ROOT_ONLY or here == () or os.path.basename(f) == "tests.rs":
            continue
        text = strip(open(f, encoding="utf-8").read())
        targets = set()
        for kind, rest, group in GROUP.findall(text):
            for item in group.split(","):
                item = item.strip().split(" as ")[0].strip()
                if item and item != "self":
                    segs = [s for s in rest.split("::") if s] + item.split("::")
                    targets.add(resolve(mods, here, kind, segs))
                elif item == "self":
                    targets.add(resolve(mods, here, kind, [s for s in rest.split("::") if s]))
        for kind, rest in PATH.findall(text):
            targets.add(resolve(mods, here, kind, [s for s in rest.split("::") if s]))
        for t in targets:
            if t and t != here and t[: len(here)] != here and here[: len(t)] != t:
                out.setdefault(here, set()).add(t)
            elif t and here[: len(t)] == t and t != here:
                # A child naming an item of its parent: an edge child -> parent.
                out.setdefault(here, set()).add(t)
    return out


def cycles(g):
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(set(g) | {w for ws in g.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def main():
    mods = modules()
    fine = edges(mods)
    # Parent -> child structure edges are implicit; a child naming its parent is fine only
    # when the parent does not name the child back through its own code.
    top = {}
    for a, bs in fine.items():
        for b in bs:
            if a[0] != b[0]:
                top.setdefault(a[0], set()).add(b[0])
    bad = False
    for c in cycles(top):
        print("layers: top-level modules import each other: " + " <-> ".join(c))
        bad = True
    for c in cycles(fine):
        print("layers: modules import each other: " + " <-> ".join("::".join(m) for m in c))
        bad = True
    if "--print" in sys.argv and not bad:
        nodes = set(top) | {d for ds in top.values() for d in ds}
        done = set()
        while len(done) < len(nodes):
            layer = sorted(m for m in nodes if m not in done and top.get(m, set()) <= done)
            print(f"{len(done) and '' or ''}{' '.join(layer)}")
            done |= set(layer)
    if bad:
        sys.exit(1)
    print(f"layers: {len(top)} top-level modules, {len(fine)} modules with imports, no cycles")


main()
