"""A multi-turn SGLang frontend program and an OpenAI-compatible chat call against a server started with
--enable-asynctls. Nothing here knows about AsyncTLS: that is the point.

    python -m sglang.launch_server --model-path MODEL --enable-asynctls &
    python docs/examples/multiturn_frontend.py --port 30000
"""

import argparse
import json
import urllib.request

import sglang as sgl

SECRET = "4471"
DOCUMENT = ("The grass is green. The sky is blue. " * 300) + f"The secret code is {SECRET}. " + ("Here we go. " * 300)


@sgl.function
def research_agent(s, document, questions):
    # every turn extends the same radix prefix, so the server reuses the document's KV and its AsyncTLS index
    s += sgl.system("Answer from the document only, briefly.")
    s += sgl.user("Document:\n" + document)
    s += sgl.assistant("I have read the document.")
    for i, q in enumerate(questions):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=24, temperature=0))


def run_frontend(url: str) -> list:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = research_agent.run(document=DOCUMENT, questions=["What is the secret code?", "Repeat it once more."])
    return [state[f"answer_{i}"] for i in range(2)]


def run_openai_chat(url: str) -> str:
    """The OpenAI chat-completions protocol; the `openai` client when installed, else the same request by hand."""
    messages = [{"role": "user", "content": DOCUMENT + "\nWhat is the secret code? Answer with the number."}]
    try:
        import openai
    except ImportError:
        body = json.dumps({"model": "default", "temperature": 0, "max_tokens": 24, "messages": messages}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=600).read())["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="default", temperature=0, max_tokens=24, messages=messages)
    return reply.choices[0].message.content


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=30000)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    print("frontend:", run_frontend(url))
    print("openai:", run_openai_chat(url))


if __name__ == "__main__":
    main()
