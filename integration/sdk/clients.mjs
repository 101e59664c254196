// Drives the official OpenAI and Anthropic Node SDKs through a Caddy with
// ai_proxy, as integration/sdk_test.go asks: node clients.mjs <base URL>.
// Prints one JSON object with what each client received.
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";

const base = process.argv[2];
const model = process.argv[3] || "sim-llama-8b";
const openai = new OpenAI({ baseURL: base + "/v1", apiKey: "sk-test", maxRetries: 0, timeout: 30000 });
const anthropic = new Anthropic({ baseURL: base, apiKey: "test", maxRetries: 0, timeout: 30000 });
const out = {};

// chat completions, streamed, with usage
{
  const stream = await openai.chat.completions.create({
    model,
    messages: [
      { role: "system", content: "You are terse." },
      { role: "user", content: "Say a few words about load balancing." },
    ],
    max_tokens: 12,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "", chunks = 0, usage = null;
  for await (const c of stream) {
    chunks++;
    if (c.choices?.[0]?.delta?.content) text += c.choices[0].delta.content;
    if (c.usage) usage = c.usage;
  }
  out.chat = { text, chunks, completion_tokens: usage?.completion_tokens ?? -1 };
}

// Responses API, streamed
{
  const stream = await openai.responses.create({
    model,
    instructions: "Answer in one line.",
    input: [{ role: "user", content: [{ type: "input_text", text: "What is a KV cache?" }] }],
    max_output_tokens: 10,
    stream: true,
  });
  let text = "", events = 0, usage = null;
  for await (const e of stream) {
    events++;
    if (e.type === "response.output_text.delta") text += e.delta;
    if (e.type === "response.completed") usage = e.response.usage;
  }
  out.responses = { text, events, output_tokens: usage?.output_tokens ?? -1 };
}

// embeddings
{
  const r = await openai.embeddings.create({ model, input: ["first text", "second text"] });
  out.embeddings = { vectors: r.data.length, dims: r.data[0]?.embedding?.length ?? 0, prompt_tokens: r.usage?.prompt_tokens ?? -1 };
}

// Anthropic Messages, streamed
{
  const stream = anthropic.messages.stream({
    model,
    system: "You are terse.",
    messages: [{ role: "user", content: "Name one LLM inference engine." }],
    max_tokens: 9,
  });
  let text = "";
  stream.on("text", (t) => { text += t; });
  const final = await stream.finalMessage();
  out.messages = { text, output_tokens: final.usage?.output_tokens ?? -1, stop_reason: final.stop_reason };
}

console.log(JSON.stringify(out));
