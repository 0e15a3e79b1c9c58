"""``peftlab ui``: a local web page for trying fine-tuned models (Gradio).

    peftlab ui --adapter runs/demo --adapter runs/bita/gsm8k

Four tabs over one ``workbench.Workbench`` (which does the work and is tested without a browser):
Chat (one prompt, the base model and every adapter answering side by side, streamed, tokens/s per
column), Runs (a run directory's config, parameters, loss curve and evaluations), Uncertainty (class
probabilities of a multiple-choice question with their spread over sampled passes) and Acceleration
(plain vs BiTA decoding of one prompt, accepted drafts highlighted). Every handler turns an error
into a one-line message on the page; the full traceback of an unexpected one goes to the console.

The server binds to the loopback interface unless ``--allow-remote`` is given, and loads adapters
from safetensors + JSON only (``peftlab.io`` never unpickles). The address (a port from 1 to 65535,
free; a host that resolves to this machine) is checked before any model loads.
"""
from __future__ import annotations

import errno
import io
import ipaddress
import os
import socket
import sys
import traceback

from peftlab.workbench import Workbench, WorkbenchError, evaluation_figure, loss_figure, \
    probabilities_figure, summarize_run

MAX_COLUMNS = 6          # chat columns on the page: the base model and up to five adapters
TEMPLATES = ["chat", "alpaca", "plain", "none"]


class UiError(ValueError):
    """A refused ``peftlab ui`` invocation (before anything is served)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Serve other machines only when asked: the page runs models and reads local directories."""
    if not is_loopback(host) and not allow_remote:
        raise UiError(f"--host {host} would serve the page to other machines (it runs models and reads local "
                      "run directories): keep the default 127.0.0.1, or add --allow-remote if you mean it")


def check_address(host: str, port: int | None) -> None:
    """Refuse a port outside 1–65535, a host that does not resolve, or an address this machine cannot
    serve on (a busy port, another machine's address), by binding it once: before any model loads."""
    if port is not None and not 1 <= port <= 65535:
        raise UiError(f"--port {port} is not a TCP port: give one from 1 to 65535, or leave --port out to take "
                      "the first free one from 7860")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as Gradio takes it
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port or 0, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as err:
        raise UiError(f"--host {host} does not resolve to an address ({getattr(err, 'strerror', None) or err}): "
                      "give an address or name of this machine, e.g. the default 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:  # no --port: port 0, which tests the host only
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UiError(f"port {port} on {host} is already in use: choose another --port, or leave --port "
                              "out to take the first free one from 7860") from None
            where = f"{host} port {port}" if port else host
            fix = " and a port you may use (above 1023 unless root)" if port else ""
            raise UiError(f"cannot serve on {where} ({err.strerror or err}): give an address of this machine as "
                          f"--host{fix}") from None


def readable(err: BaseException) -> str:
    """One line for the page: the message of an expected error, the type and message of another."""
    from peftlab.adapters import AdapterConfigError
    from peftlab.data import DataError
    from peftlab.io import AdapterFileError
    from peftlab.models import ModelLoadError

    message = " ".join(str(err).split())
    if isinstance(err, (WorkbenchError, AdapterFileError, AdapterConfigError, DataError, ModelLoadError,
                        ValueError)):
        return message
    traceback.print_exception(err, file=sys.stderr)  # unexpected: the console keeps the details
    return f"unexpected {type(err).__name__}: {message} (details in the server's console)"


def _error(err: BaseException) -> str:
    return f"**Error:** {readable(err)}"


def _image(fig):
    """A matplotlib figure as a PIL image (the figure is closed: the page keeps only pixels)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).copy()


def _png(path):
    """A PNG's pixels (handed to the page as an image: the server never serves the run directory)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


def _template(name: str) -> str | None:
    return None if name == "none" else name


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page phones nowhere
    try:
        import gradio
    except ImportError:
        raise UiError("peftlab ui needs gradio, which is not installed: pip install 'peftlab[ui]'") from None
    return gradio


def build(bench: Workbench):
    """The page (a ``gradio.Blocks``) over ``bench``."""
    gr = _gradio()

    has_chat = bool(getattr(bench.tokenizer, "chat_template", None))
    default_template = "chat" if has_chat else "alpaca"

    def headers():
        entries = [bench.entries[label] for label in bench.labels]
        return [f"### {e.label}\n<small>{e.description}</small>" for e in entries]

    def banner():
        return f"# peftlab\nBase model **{bench.base_name}** · {len(bench.labels) - 1} adapter(s) loaded"

    def base_fingerprints():
        from peftlab.models import base_fingerprints
        return base_fingerprints(bench.base)

    with gr.Blocks(title="peftlab", analytics_enabled=False) as page:
        heading = gr.Markdown(banner())
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", lines=3, scale=4, elem_id="chat-prompt",
                                    placeholder="Ask every model the same question")
                with gr.Column(scale=1):
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    template = gr.Dropdown(TEMPLATES, value=default_template, label="Template")
            with gr.Row():
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="chat-max-tokens")
                greedy = gr.Checkbox(value=True, label="Greedy (same answers as `peftlab generate`)")
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (when not greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when not greedy)")
            chat_status = gr.Markdown(elem_id="chat-status")
            titles, answers, stats, slots = [], [], [], []
            with gr.Row(equal_height=False):
                for i in range(MAX_COLUMNS):
                    with gr.Column(visible=i < len(bench.labels), min_width=220) as slot:
                        titles.append(gr.Markdown(headers()[i] if i < len(bench.labels) else ""))
                        answers.append(gr.Textbox(label="Answer", lines=12, max_lines=30, interactive=False,
                                                  elem_id=f"answer-{i}"))
                        stats.append(gr.Markdown(elem_id=f"stats-{i}"))
                    slots.append(slot)

        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                run_path = gr.Textbox(label="Run directory", scale=4, elem_id="run-path",
                                      placeholder="runs/demo (written by peftlab train, eval or calibrate)")
                show = gr.Button("Show", variant="primary", elem_id="run-show")
                load = gr.Button("Load into chat", elem_id="run-load")
            run_status = gr.Markdown(elem_id="run-status")
            with gr.Row():
                loss_plot = gr.Image(label="Loss", type="pil", elem_id="run-loss", interactive=False)
                eval_plot = gr.Image(label="Evaluation", type="pil", elem_id="run-eval", interactive=False)
            eval_table = gr.Dataframe(headers=["name", "metric", "value", "std"], label="Evaluation results",
                                      interactive=False)
            with gr.Row():
                run_config = gr.JSON(label="Config")
                run_images = gr.Gallery(label="Plots in the run directory", columns=2, height=360)

        with gr.Tab("Uncertainty", id="uncertainty"):
            gr.Markdown("Class probabilities in BLoB's framing (options under letters, the next-token softmax over "
                        "the letters). BLoB adapters draw weight noise and dropout adapters drop units on every "
                        "pass: the spread over passes is the model's uncertainty. A plain adapter gives no spread.")
            with gr.Row():
                choice_model = gr.Dropdown(bench.labels, value=(bench.with_method("blob") or bench.labels)[0],
                                           label="Model", elem_id="choice-model")
                samples = gr.Slider(1, 64, value=16, step=1, label="Sampled passes")
            question = gr.Textbox(label="Question", lines=2, elem_id="choice-question",
                                  value="Which of these is a source of light?")
            options = gr.Textbox(label="Options, one per line", lines=4, elem_id="choice-options",
                                 value="the sun\na rock\na shadow\na spoon")
            score = gr.Button("Score", variant="primary", elem_id="choice-score")
            choice_status = gr.Markdown(elem_id="choice-status")
            with gr.Row():
                choice_plot = gr.Image(label="Probabilities", type="pil", interactive=False, elem_id="choice-plot")
                choice_table = gr.Dataframe(headers=["option", "mean", "std", "min", "max"], interactive=False,
                                            label="Per option", elem_id="choice-table")

        with gr.Tab("Acceleration", id="acceleration"):
            gr.Markdown("BiTA drafts several tokens per forward pass and verifies them in the same pass: the "
                        "accelerated answer equals plain greedy decoding token for token. Highlighted tokens are "
                        "accepted drafts; the others are the base model's own verified tokens.")
            bita_labels = bench.with_method("bita")
            with gr.Row():
                bita_model = gr.Dropdown(bita_labels, value=bita_labels[0] if bita_labels else None,
                                         label="BiTA adapter", elem_id="bita-model")
                bita_tokens = gr.Slider(1, 512, value=96, step=1, label="Max new tokens")
                bita_tree = gr.Textbox(value="", label="Draft tree widths (empty: the hardware's default)",
                                       placeholder="1,1,1")
            bita_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="bita-prompt")
            race = gr.Button("Generate both ways", variant="primary", elem_id="bita-run")
            bita_status = gr.Markdown(elem_id="bita-status")
            with gr.Row():
                plain_answer = gr.Textbox(label="Plain greedy", lines=8, interactive=False, elem_id="bita-plain")
                fast_answer = gr.Textbox(label="BiTA", lines=8, interactive=False, elem_id="bita-fast")
            drafted = gr.HighlightedText(label="Accepted drafts", color_map={"draft": "green"}, show_legend=True,
                                         combine_adjacent=False, show_inline_category=False, elem_id="bita-drafted")

        # -- handlers -------------------------------------------------------------------------------

        def on_send(text, template_name, max_new, is_greedy, temp, nucleus):
            blank = ["" for _ in range(MAX_COLUMNS)]
            try:
                labels = bench.labels
                yield ["Generating…", *blank, *blank]
                for columns in bench.chat(text, labels, _template(template_name), int(max_new),
                                          0.0 if is_greedy else float(temp), float(nucleus)):
                    texts, lines = list(blank), list(blank)
                    for i, column in enumerate(columns):
                        texts[i] = column.text
                        state = "error" if column.error else "done" if column.done else "generating…"
                        lines[i] = (f"**{len(column.tokens)} tokens · {column.tokens_per_second:.1f} tokens/s** · "
                                    f"{state}" + (f"\n\n**Error:** {column.error}" if column.error else ""))
                    yield ["", *texts, *lines]
                yield [f"Done: {len(labels)} model(s) answered.", *texts, *lines]
            except Exception as err:
                yield [_error(err), *blank, *blank]

        for trigger in (send.click, prompt.submit):  # the growing answers are the progress display
            trigger(on_send, [prompt, template, max_tokens, greedy, temperature, top_p],
                    [chat_status, *answers, *stats], show_progress="hidden")

        def on_show(path):
            empty = [None, None, None, None, []]  # loss plot, evaluation plot, table, config, gallery
            try:
                summary = summarize_run(path, base_fingerprints())
            except Exception as err:
                return [_error(err), *empty]
            facts = [f"**{summary.path}**"]
            if summary.methods:
                facts.append(f"method: **{' + '.join(summary.methods)}**")
            if summary.base_model:
                facts.append(f"base model: {summary.base_model}")
            if summary.parameters is not None:
                facts.append(f"trainable parameters: **{summary.parameters:,}**")
            if summary.metrics:
                facts.append(f"{len(summary.metrics)} logged steps")
            text = " · ".join(facts) + "".join(f"\n\n⚠ {note}" for note in summary.notes)
            table = [[r["name"], r["metric"], round(r["value"], 4), None if r["std"] is None else round(r["std"], 4)]
                     for r in summary.evaluations]
            return [text, _image(loss_figure(summary.metrics)) if summary.metrics else None,
                    _image(evaluation_figure(summary.evaluations)) if summary.evaluations else None,
                    table or None, summary.config, [(_png(p), p.name) for p in summary.images]]

        show.click(on_show, [run_path], [run_status, loss_plot, eval_plot, eval_table, run_config, run_images])
        run_path.submit(on_show, [run_path], [run_status, loss_plot, eval_plot, eval_table, run_config, run_images])

        def on_load(path):
            labels_before = len(bench.labels)
            try:
                if labels_before >= MAX_COLUMNS:
                    raise WorkbenchError(f"the page shows at most {MAX_COLUMNS} models: restart `peftlab ui` "
                                         "with the adapters you want to compare")
                entry = bench.add(path)
            except Exception as err:
                return [_error(err), *[gr.skip()] * (2 * MAX_COLUMNS + 3)]
            names = headers()
            slot_updates = [gr.update(visible=i < len(names)) for i in range(MAX_COLUMNS)]
            title_updates = [names[i] if i < len(names) else "" for i in range(MAX_COLUMNS)]
            bita = bench.with_method("bita")
            return [f"Loaded **{entry.label}** ({entry.description}) into the chat.", *slot_updates, *title_updates,
                    gr.update(choices=bench.labels), gr.update(choices=bita, value=bita[0] if bita else None), banner()]

        load.click(on_load, [run_path], [run_status, *slots, *titles, choice_model, bita_model, heading])

        def on_score(label, question_text, options_text, passes):
            try:
                result = bench.class_probabilities(label, question_text, options_text.splitlines(), int(passes))
            except Exception as err:
                return [_error(err), None, None]
            mean, std = result.mean, result.std
            best = int(mean.argmax())
            spread = float(std.max())
            verdict = ("no spread: this model is deterministic (no BLoB noise, no adapter dropout)" if spread < 1e-9
                       else f"largest std over passes {spread:.3f}")
            rows = [[label_text, round(float(mean[i]), 4), round(float(std[i]), 4),
                     round(float(result.samples[:, i].min()), 4), round(float(result.samples[:, i].max()), 4)]
                    for i, label_text in enumerate(result.labels)]
            return [f"**{label}** picks **{result.labels[best]}** (p = {float(mean[best]):.3f}) · {verdict}",
                    _image(probabilities_figure(result)), rows]

        score.click(on_score, [choice_model, question, options, samples], [choice_status, choice_plot, choice_table])

        def on_race(label, text, max_new, tree_text, template_name):
            # A static message instead of Gradio's ticking progress timer: the browser redrawing it
            # competes for the CPU and, on a small machine, slows the timed decoding (measured 2×).
            yield ["Decoding plainly, then with BiTA (timed; the page stays still meanwhile)…", "", "", None]
            try:
                if not label:
                    raise WorkbenchError("no BiTA adapter is loaded: start `peftlab ui --adapter RUN` with a run of "
                                         "`peftlab train --method bita`, or load one in the Runs tab")
                from peftlab.methods.bita import parse_tree

                tree = parse_tree(tree_text)
                result = bench.bita_race(label, text, _template(template_name), int(max_new), tree)
            except Exception as err:
                yield [_error(err), "", "", None]
                return
            d = result.decoded
            verdict = "identical to plain greedy ✓" if result.identical else "DIFFERENT from plain greedy ✗"
            summary = (f"{verdict} · {len(d.tokens)} tokens in {d.forwards} forward passes "
                       f"(**{d.tokens_per_forward:.2f} tokens per pass**, {sum(d.drafted)} accepted drafts) · "
                       f"plain {result.plain_seconds:.2f} s, BiTA {d.seconds:.2f} s: "
                       f"**{result.speedup:.2f}× speed-up**")
            pieces = [(piece, "draft" if was_drafted else None) for piece, was_drafted in result.pieces]
            yield [summary, result.plain_text, result.accelerated_text, pieces]

        race.click(on_race, [bita_model, bita_prompt, bita_tokens, bita_tree, template],
                   [bita_status, plain_answer, fast_answer, drafted], show_progress="hidden")
    return page


def theme():
    """Gradio's default look with the system's fonts (the default fetches web fonts, and this page
    must work offline)."""
    return _gradio().themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                    font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def add_arguments(p) -> None:
    p.add_argument("--base", help="base model: a Hugging Face id, a local directory, a .gguf file or the embedded "
                                  "default (default: the first adapter's base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[],
                   help="a run directory to load beside the base model (repeatable, at most "
                        f"{MAX_COLUMNS - 1}); more can be loaded from the page's Runs tab")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host that other machines can reach (off by default)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default float32)")


def run(args) -> int:
    """``peftlab ui``: check the address, load the models, serve until interrupted."""
    check_host(args.host, args.allow_remote)
    check_address(args.host, args.port)
    _gradio()
    if len(args.adapter) > MAX_COLUMNS - 1:
        raise UiError(f"{len(args.adapter)} adapters given; the page shows at most {MAX_COLUMNS - 1} beside the "
                      "base model: pass fewer --adapter")
    from peftlab.workbench import check_adapter_dir

    paths = [check_adapter_dir(path) for path in args.adapter]  # refuse before loading any model
    # The first adapter's base (peftlab or PEFT file) when --base is not given, as `peftlab generate` finds it.
    bench = Workbench(args.base, dtype=args.dtype, adapter=paths[0] if paths else None)
    for path in paths[1:]:
        bench.add(path)
    page = build(bench)
    page.queue(default_concurrency_limit=1)  # one model computation at a time: timings stay honest
    try:
        page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, share=False,
                    inbrowser=False, quiet=True, show_error=False, theme=theme(), ssr_mode=False, mcp_server=False)
    except OSError as err:  # taken since check_address, or no free port from 7860 to 7959
        where = f"port {args.port}" if args.port else "any port from 7860 to 7959"
        raise UiError(f"cannot serve on {args.host} {where} ({' '.join(str(err).split())[:100]}): choose a free "
                      "--port") from None
    print(f"peftlab ui: serving {page.local_url} (base {bench.base_name}, {len(bench.labels) - 1} adapter(s)); "
          "Ctrl-C stops", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0
