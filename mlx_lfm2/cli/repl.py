"""The chat REPL itself: reading a message, streaming a reply, the /commands and tool rounds.

``cli/chat.py`` parses the flags, picks and loads the model and hands a ``Chat`` to ``Repl``.
Text we did not write (user input, paths, model replies, tool calls and results) is never read
as rich markup: it is escaped or printed as ``Text``, so ``[/x]`` cannot crash the REPL and
``[conceal]`` cannot hide a tool call's arguments from the user asked to approve it.
"""

from __future__ import annotations

import re

from rich.markup import escape
from rich.text import Text

HELP = """\
Commands in the chat:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and reset
  /save PATH      save the conversation (transcript and cache)
  /load PATH      load a saved conversation, or a prompt cached by mlx_lm.cache_prompt
  /retry          regenerate the last reply (rewinds the cache, no re-prefill)
  /undo           drop the last exchange (your message and the reply)
  /stats          speed and memory of the last reply, messages and cached tokens
  /adapter NAME   reply with adapter NAME (given with --adapter NAME=PATH); /adapter off: the base
  /help           this help
  /quit           leave (or Ctrl-D)
Multi-line input: end a line with \\ to continue, or wrap a block in triple quotes (\"\"\").
Ctrl-C stops a reply and keeps the conversation."""


def read_message(console) -> str:
    """One user message; ``\\`` continues a line, triple quotes open a block."""
    lines = []
    line = console.input("[bold green]>>> [/]")
    if line.strip().startswith('"""'):
        body = line.strip()[3:]
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            body = console.input("[dim]... [/]")
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines).strip()
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = console.input("[dim]... [/]")
    lines.append(line)
    return "\n".join(lines)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Also invisible or reordering format characters (zero-width, bidi overrides): shown in what
# the user approves, though not in chat text, where joiners belong to emoji.
_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def visible(text: str, strict: bool = False) -> str:
    """Control characters as ``\\xNN`` (``\\uNNNN``): an escape sequence in model or tool text
    must not move the cursor or conceal what follows on the user's terminal."""
    return (_HIDDEN if strict else _CONTROL).sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text)


def stats_line(r) -> str:
    return (f"[dim]{r.prompt_tokens} prompt tokens @ {r.prompt_tps:.1f} tok/s · "
            f"{r.generation_tokens} tokens @ {r.generation_tps:.1f} tok/s · "
            f"peak {r.peak_memory:.2f} GB · {r.finish_reason}"
            + (f" · {r.accepted_tokens}/{r.draft_tokens} drafted tokens accepted" if r.draft_tokens else "")
            + "[/]")


class Repl:
    model_name = None  # the --model given (or chosen): what an mlx-lm prompt cache must name

    def __init__(self, chat, console, tools: dict, markdown: bool, max_tokens: int):
        self.chat, self.console, self.tools = chat, console, tools
        self.markdown, self.max_tokens = markdown, max_tokens

    def stream(self, responses) -> str:
        """Show a reply as it streams (tool-call text held back); returns the full text."""
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.text import Text

        from ..text.tool_stream import ToolCallStream

        calls, shown = ToolCallStream(bare_names=self.tools), ""  # names: LFM2.5's unmarked calls
        # hyperlinks=False: a link shows as "text (url)", its real target, never a hidden one.
        render = (lambda s: Markdown(visible(s), hyperlinks=False)) if self.markdown else (lambda s: Text(visible(s)))
        interrupted = (lambda s: s + "\n\n*[interrupted]*") if self.markdown else (lambda s: s + " [interrupted]")
        try:
            with Live(render(""), console=self.console, refresh_per_second=12,
                      vertical_overflow="visible") as live:
                try:
                    for r in responses:
                        piece = calls.feed(r.text)
                        if r.finish_reason:
                            piece += calls.finish()
                        if piece:
                            shown += piece
                            live.update(render(shown))
                except KeyboardInterrupt:
                    responses.close()
                    live.update(render(interrupted(shown)))
                    return shown
        except KeyboardInterrupt:  # in Live's start or stop, outside the loop: same outcome
            responses.close()
            self.console.print(render(interrupted(shown)))
            return shown
        if self.chat.last is not None:
            self.console.print(stats_line(self.chat.last))
        return shown

    def turn(self, text: str) -> None:
        """One user message and the tool rounds it leads to; a message that does not fit the
        context is dropped with its turn, and the conversation stays as it was."""
        from ..engine.request import PromptTooLongError

        try:
            self._turn(text)
        except PromptTooLongError as e:
            self.chat.undo()
            self.console.print(Text(f"not sent: {e} (/reset starts one)", style="red"))

    def _turn(self, text: str) -> None:
        self.stream(self.chat.send(text, max_tokens=self.max_tokens))
        for _ in range(8):  # a few rounds of tool use per user turn at most
            from ..engine.distributed import from_leader
            from ..text.tools import call_tool, parse_tool_calls

            reply = self.chat.messages[-1]["content"]
            calls = parse_tool_calls(reply, bare_names=self.tools).calls if self.tools else []
            if not calls:
                return
            for call in calls:
                args = ", ".join(f"{k}={v!r}" for k, v in call["arguments"].items())
                self.console.print(Text.assemble(("tool call", "yellow"), " ",
                                                 (visible(call["name"], strict=True), "bold"),
                                                 f"({visible(args, strict=True)})"))
                answer = self.console.input("[yellow]run it? \\[y/N] [/]").strip().lower()
                if answer in ("y", "yes"):  # under mlx.launch: run once, on rank 0
                    result = from_leader(call_tool, self.tools, call)
                else:
                    result = '{"error": "the user declined to run this tool"}'
                self.console.print(Text(f"→ {visible(result[:500])}", style="dim"))
                self.chat.messages.append({"role": "tool", "content": result})
            self.stream(self.chat.reply(max_tokens=self.max_tokens))

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.console.print(HELP, markup=False)
        elif cmd == "/reset":
            self.chat.reset()
            self.console.print("[dim]conversation reset[/]")
        elif cmd == "/system":
            self.chat.reset(system=arg)
            self.console.print(f"[dim]system prompt set ({len(arg)} chars); conversation reset[/]")
        elif cmd in ("/save", "/load") and not arg:
            self.console.print(f"[red]usage: {cmd} PATH[/]")
        elif cmd == "/save":
            try:
                self.chat.save(arg)
                self.console.print(f"[dim]saved {len(self.chat.messages)} messages to {escape(arg)}[/]")
            except (OSError, ValueError) as e:  # the conversation stays as it was
                self.console.print(Text(f"could not save: {e}", style="red"))
        elif cmd == "/load":
            try:
                self.chat.load(arg, self.model_name)
                self.console.print(f"[dim]{loaded_line(self.chat, arg)}[/]")
            except (OSError, ValueError) as e:
                self.console.print(Text(str(e), style="red"))
        elif cmd == "/retry":
            if not any(m["role"] == "user" for m in self.chat.messages):
                self.console.print("[dim]nothing to retry[/]")
            else:
                self.stream(self.chat.retry(max_tokens=self.max_tokens))
        elif cmd == "/undo":
            try:
                dropped = self.chat.undo()
                self.console.print(f"[dim]dropped {len(dropped)} messages[/]")
            except ValueError as e:
                self.console.print(Text(str(e), style="dim"))
        elif cmd == "/adapter":
            self.switch_adapter(arg)
        elif cmd == "/stats":
            r = self.chat.last
            self.console.print(stats_line(r) if r else "[dim]no reply yet[/]")
            self.console.print(f"[dim]{self.chat.cached_tokens} tokens in the cache, "
                               f"{len(self.chat.messages)} messages[/]")
        else:
            self.console.print(Text.assemble((f"unknown command {cmd}", "red"), " (try /help)"))
        return True

    def switch_adapter(self, arg: str) -> None:
        """``/adapter NAME|off``, and what the next turn re-prefills (a cache made under another
        adapter is not valid under this one)."""
        from ..model.lora_rows import NotLoaded

        if not arg:
            return self.console.print(Text(f"adapter: {self.chat.adapter or 'off'} (/adapter NAME|off)", style="dim"))
        name = None if arg in ("off", "base") else arg
        try:
            total, cached = self.chat.use_adapter(name)
        except NotLoaded as e:
            return self.console.print(Text(f"{e} (give it with --adapter NAME=PATH)", style="red"))
        self.console.print(Text(f"replies now use {f'adapter {name}' if name else 'the base'}" + (
            f"; the next turn re-prefills {total - cached} of {total} tokens ({cached} cached under it; "
            "a cache made under another adapter is not valid here)" if total else ""), style="dim"))

    def run(self) -> None:
        while True:
            try:
                line = read_message(self.console)
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /quit to leave)[/]")
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip()):
                    return
                continue
            self.turn(line)


def loaded_line(chat, path: str) -> str:
    """What ``/load`` or ``--prompt-cache-file`` brought in."""
    if chat.head and not chat.messages:
        return (f"loaded {escape(path)}: {chat.head} cached tokens, no transcript "
                "(your first message continues the cached text)")
    return (f"loaded {len(chat.messages)} messages from {escape(path)}"
            + (f"; replies use adapter {escape(chat.adapter)}" if chat.adapter else ""))
