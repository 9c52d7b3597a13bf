// A small Markdown renderer for model output. Safe by construction: it builds DOM nodes and sets only
// textContent and checked attributes (http(s) links), so no text from the model is ever parsed as HTML.
// Covers what chat answers use: paragraphs, headings, lists, block quotes, fenced code, inline code,
// bold, italic and links. Anything else shows as plain text.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
// Inline spans, tried left to right: `code`, **bold**, *italic* / _italic_, [text](http(s)://url).
const INLINE = new RegExp([
  /(`+)([\s\S]*?[^`])\1(?!`)/.source, // `code` (groups 1, 2)
  /\*\*([\s\S]+?)\*\*/.source, /__([\s\S]+?)__/.source, // bold (3, 4)
  /\*([^*\s][^*]*?)\*/.source, /\b_([^_\s][^_]*?)_\b/.source, // italic (5, 6)
  /\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/.source, // a link (7, 8): http(s) only
].join("|"), "g");

function el(tag, ...children) {
  const node = document.createElement(tag);
  for (const c of children) node.append(c);
  return node;
}

/** Inline markdown of one block of text -> nodes appended to `parent`. */
function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    if (m[2] !== undefined) {
      parent.append(el("code", m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      inline(parent.appendChild(el("strong")), m[3] ?? m[4]);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      inline(parent.appendChild(el("em")), m[5] ?? m[6]);
    } else {
      const a = el("a", m[7]);
      a.href = m[8]; // the pattern admits http(s) URLs only: no javascript: links
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      parent.append(a);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function lines(parent, textLines) {
  textLines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    inline(parent, line);
  });
}

/** Markdown text -> a DocumentFragment. An unclosed code fence (mid-stream) renders as code so far. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const src = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < src.length) {
    const line = src[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i += 1;
      while (i < src.length && !src[i].trim().startsWith(fence[1])) body.push(src[i++]);
      i += 1; // the closing fence
      const pre = el("pre");
      if (fence[2]) pre.append(el("span", fence[2]));
      if (fence[2]) pre.firstChild.className = "lang";
      const code = el("code", body.join("\n"));
      pre.append(code);
      out.append(pre);
      continue;
    }
    if (!line.trim()) { i += 1; continue; }
    const heading = line.match(HEADING);
    if (heading) {
      // Model headings sit inside a message: h3..h6 keep the page's own outline intact.
      const level = Math.min(6, heading[1].length + 2);
      inline(out.appendChild(el(`h${level}`)), heading[2]);
      i += 1;
      continue;
    }
    const kind = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
    if (kind) {
      const list = el(kind === BULLET ? "ul" : "ol");
      while (i < src.length && kind.test(src[i])) inline(list.appendChild(el("li")), src[i++].match(kind)[1]);
      out.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < src.length && QUOTE.test(src[i])) quoted.push(src[i++].match(QUOTE)[1]);
      out.append(el("blockquote", renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const para = [];
    while (i < src.length && src[i].trim() && !FENCE.test(src[i]) && !HEADING.test(src[i]) &&
           !BULLET.test(src[i]) && !NUMBERED.test(src[i]) && !QUOTE.test(src[i])) para.push(src[i++]);
    lines(out.appendChild(el("p")), para);
  }
  return out;
}
