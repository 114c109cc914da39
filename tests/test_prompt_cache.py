"""The prompt-cache store: longest shared prefix, namespaces kept apart, LRU, a lower tier."""

from mlx_lfm2.engine.prompt_cache import PromptCache, PromptCacheStore


class NoLayers:
    """A model whose cache has no layers: entries are their text alone."""

    def make_cache(self):
        return []


def entry(text):
    return PromptCache(NoLayers(), [], text)


def test_take_copies_the_entry_sharing_the_longest_prefix_within_its_namespace():
    store = PromptCacheStore(NoLayers(), entries=4)
    for text in ("system: hi", "system: hi, user: a", "other"):
        store.keep(entry(text))
    store.keep(entry("system: hi, user: a, assistant: b"), namespace="adapter-1")
    got = store.take("system: hi, user: a, assistant: c")
    assert got.text == "system: hi, user: a" and got is not store.lookup("system: hi, user: a")[0]
    assert store.take("system: hi, user: a, assistant: b", "adapter-1").text == "system: hi, user: a, assistant: b"
    assert store.take("nothing alike").text == ""  # fresh
    assert store.take("system", "adapter-2").text == ""  # another namespace shares nothing


def test_the_least_recently_used_entry_goes_and_partial_caches_are_not_kept():
    store = PromptCacheStore(NoLayers(), entries=2)
    store.keep(entry("a1"))
    store.keep(entry("b1"))
    store.take("a1 more")  # a1 is now the most recent
    store.keep(entry("c1"))
    assert {pc.text for pc in store._entries.values()} == {"a1", "c1"} and len(store) == 2
    store.keep(PromptCache(NoLayers(), [], "d1", tokens=[5]))  # a token the cache does not hold
    store.keep(entry(""))
    assert len(store) == 2 and store.latest().text == "c1"


def test_a_lower_tier_gets_every_kept_entry_and_serves_a_longer_prefix():
    class Tier:
        def __init__(self):
            self.stored, self.asked = [], []

        def lookup(self, namespace, text, longer_than=0, ids=None):
            self.asked.append((namespace, text, longer_than))
            fits = [pc for ns, pc in self.stored if ns == namespace and text.startswith(pc.text)
                    and len(pc.text) > longer_than]
            return max(fits, key=lambda pc: len(pc.text), default=None)  # the longest prefix

        def store(self, namespace, pc):
            self.stored.append((namespace, pc))

    tier = Tier()
    store = PromptCacheStore(NoLayers(), entries=1, lower=tier)
    store.keep(entry("long shared prefix"), namespace="x")
    store.keep(entry("long"), namespace="x")  # evicts the longer one from memory
    assert [pc.text for _, pc in tier.stored] == ["long shared prefix", "long"]
    assert store.take("long shared prefix and more", "x").text == "long shared prefix"
    assert tier.asked[-1] == ("x", "long shared prefix and more", len("long"))  # what memory shares
