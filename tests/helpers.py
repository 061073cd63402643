"""Helpers shared by the test modules: data built in code, stand-in servers and models, and the
check that a rendered notebook shows results only. Test modules import from here (or from
``tinyrun``), never from one another or from ``conftest`` (``test_api`` checks)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import numpy as np
import scipy.sparse as sp

# --- preference pairs and evaluation settings for the tiny model -----------------------------------

SMALL = dict(
    n_prompts=8,
    max_new_tokens=12,
    n_ab=6,
    n_harmful=3,
    n_xstest=3,
    behaviour_max_new_tokens=8,
    n_boot=200,
    concepts="all",
    progress=False,
)


TOPICS = ["bread", "tea", "rain", "cats", "maps", "jazz", "glue", "kites", "salt", "moss", "owls", "ink"]


def synthetic_pairs(n=48):
    """Short pairs (fast on the tiny model) whose chosen response opens with a flattering phrase."""
    from anatomy_nb.data.schema import PreferencePair

    return [
        PreferencePair(
            id=f"s{i}",
            prompt=({"role": "user", "content": f"Tell me about {TOPICS[i % 12]} ({i // 12})."},),
            chosen=f"Great question! {TOPICS[i % 12].capitalize()} is a fine thing.",
            rejected=f"{TOPICS[i % 12].capitalize()} is a thing, I suppose."
            if i % 3
            else f"Sorry, {TOPICS[i % 12]} is hard.",
        )
        for i in range(n)
    ]


# --- synthetic feature tables with known answers (stage 2) -----------------------------------------


def synthetic(n=400, d=120, planted=0.3, seed=0, swap=None):
    """Background features fire independently (same rate on both sides); block A (0-5) and block
    B (6-11) each co-fire through a latent switch. A's switch is on more often in chosen responses
    (by ``planted``); B's is not."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.02, 0.3, d)

    def side(p_a):
        F = rng.uniform(size=(n, d)) < rates
        za = rng.uniform(size=n) < p_a
        zb = rng.uniform(size=n) < 0.3
        F[:, :6] = za[:, None] & (rng.uniform(size=(n, 6)) < 0.85)
        F[:, 6:12] = zb[:, None] & (rng.uniform(size=(n, 6)) < 0.85)
        return F

    Fc, Fr = side(0.15 + planted), side(0.15)
    if swap is not None:  # shuffle sides: the null
        Fc, Fr = np.where(swap[:, None], Fr, Fc), np.where(swap[:, None], Fc, Fr)
    ntok = rng.integers(20, 200, size=(n, 2))
    from anatomy_nb.concepts.activity import PairFeatures

    return PairFeatures(
        sp.csr_matrix(Fc.astype(np.float32)),
        sp.csr_matrix(Fr.astype(np.float32)),
        ntok,
        np.arange(n),
        [""] * n,
        [""] * n,
        [""] * n,
    )


def with_edges(pf, seed=0, rate=0.2):
    """The same pairs with opening / ending firing sets: each feature that fires in a response
    fires in its opening (and, independently, its ending) with probability ``rate``, whatever the
    side: edge views with no effect of their own."""
    rng = np.random.default_rng(seed)

    def edge(F):
        F = F.toarray() > 0
        return sp.csr_matrix((F & (rng.uniform(size=F.shape) < rate)).astype(np.float32))

    from anatomy_nb.concepts.activity import PairFeatures

    edges = {e: (edge(pf.fires_chosen), edge(pf.fires_rejected)) for e in ("opening", "ending")}
    return PairFeatures(
        pf.fires_chosen, pf.fires_rejected, pf.ntok, pf.groups, pf.prompts, pf.chosen, pf.rejected, edges=edges
    )


def knn_reference(fires, k, min_phi):
    """The graph the dense path built (stage 2 before the scalable paths): the dense phi matrix
    (diagonal 0), each row's k largest by ``argpartition``, kept when either end chose it."""
    from anatomy_nb.concepts.cofiring import phi_correlation

    phi = phi_correlation(fires, np.arange(fires.shape[1]))
    m = phi.shape[0]
    nbrs = np.argpartition(-phi, kth=k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(m), k)
    w = phi[rows, nbrs.ravel()]
    keep = w >= min_phi
    A = sp.coo_matrix((w[keep], (rows[keep], nbrs.ravel()[keep])), shape=(m, m)).tocsr()
    return A.maximum(A.T).toarray(), phi


# --- an LLM stand-in and an OpenAI-compatible server on loopback ------------------------------------


class KeywordJudge:
    """A stand-in model: explains by the peak token, judges by whether the keyword occurs."""

    def complete(self, prompt, max_new_tokens=32):
        if "Answer with the phrase only" in prompt:
            line = next(ln for ln in prompt.splitlines() if ln.startswith("ACTIVE:"))
            peak = line.split("[[", 1)[1].split("]]", 1)[0]
            return f"the word {peak.strip()}"
        desc = prompt.split('described as: "', 1)[1].split('"', 1)[0]
        word = desc.split()[-1]
        text = prompt.split("Text: ", 1)[1]
        return "yes" if word.lower() in text.lower() else "no"


class ChatServer:
    """A small server that speaks the OpenAI chat-completions protocol on loopback (real HTTP, one
    thread per request), answering as ``KeywordJudge`` with a usage block; it records every request
    and the most requests it had in flight at once."""

    def __init__(self, delay: float = 0.02, answer=None):
        from http.server import ThreadingHTTPServer

        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        lock, outer = threading.Lock(), self
        answer = answer or KeywordJudge().complete

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests.append({**body, "path": self.path, "auth": self.headers.get("Authorization")})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay)
                prompt = body["messages"][0]["content"]
                text = answer(prompt, body["max_tokens"])
                out = json.dumps(
                    {
                        "choices": [{"message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())},
                    }
                ).encode()
                with lock:
                    outer.in_flight -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- rendered notebooks ------------------------------------------------------------------------------

NOISE = ("Warning", "warnings.warn", "it/s]", "s/it]", "Loading weights", "%|")


def assert_clean_outputs(nb) -> None:
    """A rendered notebook shows results, not library chatter: no error, no warning, no progress bar
    in any cell's output (headless runs keep progress on the terminal; ui.notebooks.HEADLESS_ENV)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            assert out.get("output_type") != "error", (i, out.get("ename"), out.get("evalue"))
            text = (
                out.get("text", "")
                if out.get("output_type") == "stream"
                else "".join(out.get("data", {}).get("text/plain", ""))
            )
            noisy = [n for n in NOISE if n in text]
            assert not noisy, f"cell {i}: {noisy} in {text[:300]!r}"
