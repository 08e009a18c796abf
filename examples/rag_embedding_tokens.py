"""A RAG pipeline that counts embedding tokens: indexing, retrieval and the answer.

LlamaIndex embeds three documents and a question, retrieves, and answers; LangChain's
embeddings are wrapped in TrackedEmbeddings for a second store. Embedding tokens are
counted with the embedding model's encoding and priced like any other tokens.

    python examples/rag_embedding_tokens.py
"""

import os

from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM

from usage_callbacks import UsageTracker
from usage_callbacks.langchain import TrackedEmbeddings

#: A database of its own: examples sharing ./usage.db counted each other's rows.
DB = os.environ.get("USAGE_CALLBACKS_DB", "sqlite:///rag_embedding_tokens.db")

DOCS = [
    "Invoices are issued on the first business day of the month.",
    "Enterprise plans include a dedicated support engineer.",
    "Data is stored in the EU region unless configured otherwise.",
]


class SmallEmbedding(DeterministicFakeEmbedding):
    model: str = "text-embedding-3-small"


def main() -> None:
    with UsageTracker(DB) as tracker:
        with tracker.session("llamaindex-rag") as llama_session:
            index = VectorStoreIndex.from_documents(
                [Document(text=text) for text in DOCS], embed_model=MockEmbedding(embed_dim=8)
            )
            engine = index.as_query_engine(llm=MockLLM(max_tokens=24), similarity_top_k=1)
            print("answer:", str(engine.query("Where is data stored?"))[:40], "...")
        embeddings = TrackedEmbeddings(SmallEmbedding(size=8), tracker)
        with tracker.session("langchain-rag") as lang_session:
            store = InMemoryVectorStore(embedding=embeddings)
            store.add_texts(DOCS)
            store.similarity_search("When are invoices issued?", k=1)
        for session in (llama_session, lang_session):
            usage = session.usage
            print(
                f"{session.session_id}: {usage.embedding_tokens} embedding tokens, "
                f"{usage.prompt_tokens} prompt, {usage.completion_tokens} completion, "
                f"${usage.cost_estimate_usd:.6f}"
            )


if __name__ == "__main__":
    main()
