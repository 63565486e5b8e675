"""A multi-turn SGLang frontend program and an OpenAI-compatible chat call against a server started with
--enable-asynctls. Nothing here knows about AsyncTLS: that is the point.

    python -m sglang.launch_server --model-path MODEL --enable-asynctls &
    python docs/examples/multiturn_frontend.py --port 30000
"""

import argparse

import sglang as sgl


@sgl.function
def research_agent(s, document, questions):
    # every turn extends the same radix prefix, so the server reuses the document's KV and its AsyncTLS index
    s += sgl.system("Answer from the document only, briefly.")
    s += sgl.user("Document:\n" + document)
    s += sgl.assistant("I have read the document.")
    for i, q in enumerate(questions):
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=24, temperature=0))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=30000)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    document = ("The grass is green. The sky is blue. " * 300) + "The secret code is 4471. " + ("Here we go. " * 300)
    state = research_agent.run(document=document, questions=["What is the secret code?", "Repeat it once more."])
    print("frontend:", [state[f"answer_{i}"] for i in range(2)])

    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="default", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": document + "\nWhat is the secret code? Answer with the number."}])
    print("openai:", reply.choices[0].message.content)


if __name__ == "__main__":
    main()
