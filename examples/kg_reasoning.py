"""A multi-hop knowledge-graph reasoning agent (MINERVA-style) trained with keras_bpq.

A query is `(head, relation, ?)`. The agent starts at `head`; at each of `T`
hops it picks one outgoing edge `(relation, next entity)` of its current
entity, or the self-loop `NO_OP` edge every entity has ("stay"); its answer is
where it ends, at cost 0 on the true tail and 1 elsewhere. Every hop is a
masked `keras_bpq.Categorical` over the entity's padded action list, so the
model is a chain of `T` categorical nodes. The policy reads embeddings of the
query relation, the current entity and the path so far (a GRU cell over the
`(relation, entity)` edges taken); with `--noentity_embeddings` the entities'
vectors stay zero and it reads relations only (MINERVA's setting for UMLS and
Kinship: path rules that hold for every entity).

Masks (MINERVA's protocol, its `create_triple_store`): padded actions; the
query's own edge `(head, r, tail)` and its inverse `(tail, r_inv, head)`; and
at the last hop, edges into the query's *other* true tails. For a training
query those are the tails of `(head, r)` among the *training* triples only;
dev and test answers are never shown to training. For a dev or test query they
are the tails of `(head, r)` over every split, masked at the last hop of the
beam and removed from the ranking (the filtered setting). Evaluation is beam
search over the policy's log-probabilities, filtered, on the tail only:
Hits@1/3/10 and MRR (see `beam_search` for how answers are pooled; `ranks`:
entities tied with the answer share their mean rank).

Exploration, the same for every estimator: an entropy bonus on each hop's
policy (`--entropy_beta`) and, optionally, action dropout (`--action_dropout`,
`HopLogits`: a training pass hides a share of each hop's allowed actions, and
the hop's Categorical is the policy over those left).

Data: UMLS and Kinship in their standard splits, vendored under
`examples/data/` (see its README); inverse edges are added to the graph.

    python examples/kg_reasoning.py --dataset=umls --estimator=auto --steps=2000
    # the agent of benchmarks/results/kg.md:
    python examples/kg_reasoning.py --dataset=umls --noentity_embeddings --dim=64 --hidden=128 --action_dropout=0.5
    python examples/kg_reasoning.py --estimator=minerva --export_dir=serving/kg/1
"""

import dataclasses
import json
import pathlib
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import keras_bpq
from keras_bpq import graph as graph_lib

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
NEG_INF = float("-inf")
# The critics' embedding size and width (`critics_for`); benchmarks/kg_equal_time.py's sections `umls` / `kinship`
# train the default with these and with 32 / 64 side by side.
CRITIC_DIM, CRITIC_HIDDEN = 16, 32

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "umls", ["umls", "kinship"], "Dataset under examples/data/.")
flags.DEFINE_integer("hops", 2, "Hops per walk (T).")
flags.DEFINE_integer("rollouts", 20, "Rollouts per query (compile(num_samples=...)).")
flags.DEFINE_string(
    "estimator", "auto", "'minerva' (reinforce, EMA baseline 0.95, standardised advantage), "
    "any keras_bpq estimator name ('auto', 'rloo', 'reinforce', ...), 'critic_cv_nodev' (critic_cv without "
    "the later hop's deviation), or one per hop: "
    "'hop_1=critic_cv+hop_2=minerva'.",
)
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("beam", 100, "Beam width of the evaluation.")
flags.DEFINE_enum("beam_pool", "max", ["max", "sum"], "How the beam scores an entity from the paths ending at "
                  "it: 'max' (its most probable path; MINERVA's and MultiHopKG's default) or 'sum' (log-sum-exp "
                  "of their log-probabilities: every path counts).")
flags.DEFINE_bool("beam_unique", True, "At the last hop keep the `beam` best distinct entities (MultiHopKG), "
                  "not the `beam` best paths (MINERVA's beam, which can end at one entity).")
flags.DEFINE_integer("batch_size", 256, "Queries per step (each gives `rollouts` rows).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("dim", 32, "Embedding size.")
flags.DEFINE_integer("hidden", 64, "Policy (GRU and MLP) width.")
flags.DEFINE_integer("critic_dim", CRITIC_DIM, "Embedding size of the critics (`critics_for`).")
flags.DEFINE_integer("critic_hidden", CRITIC_HIDDEN, "Width of the critics (`critics_for`).")
flags.DEFINE_float(
    "entropy_beta", 0.05, "Entropy bonus on every hop's policy (a regularisation loss, the same for every "
    "estimator; decayed x0.9 every 200 steps, as MINERVA's). 0 turns it off.")
flags.DEFINE_float(
    "action_dropout", 0.0, "While training, each allowed action of a hop is hidden with this probability "
    "(a row keeps its mask if none would stay): MultiHopKG's action dropout made part of the policy, so "
    "every estimator stays unbiased for the thinned policy; evaluation uses the whole mask.")
flags.DEFINE_bool(
    "entity_embeddings", True, "The policy reads entity embeddings (off: their vectors stay zero and the policy "
    "reads relations only, MINERVA's `use_entity_embeddings=0`, its UMLS and Kinship setting).")
flags.DEFINE_integer("eval_every", 100, "Evaluate on the dev split every this many steps.")
flags.DEFINE_integer("steps_per_execution", 10, "Steps per compiled call.")
flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"], "compile(jit_compile=...): 'auto' leaves it to Keras, "
    "which compiles the step with XLA only where a GPU is present; 'true' compiles it with XLA on a CPU too.")
flags.DEFINE_string("out_json", "", "If set, write the run's curve and test metrics there.")
flags.DEFINE_string("export_dir", "", "If set, export the trained agent there (a SavedModel).")


# -- data ------------------------------------------------------------------
@dataclasses.dataclass
class KnowledgeGraph:
    """Entities, relations (originals, then `<r>_inv`, then NO_OP and PAD),
    id triples per split, and the padded action table of the training graph."""

    entities: list
    relations: list
    splits: dict  # split name -> int32 [N, 3] (head, relation, tail)
    action_rel: np.ndarray  # [E, A] int32
    action_ent: np.ndarray  # [E, A] int32
    action_mask: np.ndarray  # [E, A] bool
    known_tails: dict  # (head, relation) -> set of tails, over all splits (dev/test filtering)
    train_tails: dict  # (head, relation) -> set of tails, over the "train" split (training masks)

    @property
    def num_entities(self):
        return len(self.entities)

    @property
    def num_base_relations(self):
        return (len(self.relations) - 2) // 2

    @property
    def no_op(self):
        return len(self.relations) - 2

    @property
    def max_actions(self):
        return self.action_rel.shape[1]


def read_triples(path):
    """`head<TAB>relation<TAB>tail` lines as a list of string triples."""
    lines = pathlib.Path(path).read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line.strip()]


def build_graph(splits):
    """A `KnowledgeGraph` from `{split: [(h, r, t), ...]}`; the graph holds the
    "train" triples and their inverses, plus a NO_OP self-loop per entity."""
    entities = sorted({e for triples in splits.values() for h, _, t in triples for e in (h, t)})
    base = sorted({r for triples in splits.values() for _, r, _ in triples})
    relations = base + [f"{r}_inv" for r in base] + ["NO_OP", "PAD"]
    e_id = {e: i for i, e in enumerate(entities)}
    r_id = {r: i for i, r in enumerate(relations)}
    ids = {
        name: np.array([[e_id[h], r_id[r], e_id[t]] for h, r, t in triples], np.int32).reshape(-1, 3)
        for name, triples in splits.items()
    }
    num_base = len(base)
    edges = [set() for _ in entities]
    for h, r, t in ids.get("train", np.zeros((0, 3), np.int32)):
        edges[h].add((r, t))
        edges[t].add((r + num_base, h))
    width = 1 + max(len(e) for e in edges)
    no_op, pad = r_id["NO_OP"], r_id["PAD"]
    action_rel = np.full((len(entities), width), pad, np.int32)
    action_ent = np.tile(np.arange(len(entities), dtype=np.int32)[:, None], [1, width])
    action_mask = np.zeros((len(entities), width), bool)
    for e, out in enumerate(edges):
        row = [(no_op, e)] + sorted(out)
        action_rel[e, : len(row)] = [r for r, _ in row]
        action_ent[e, : len(row)] = [t for _, t in row]
        action_mask[e, : len(row)] = True
    known, train_known = {}, {}
    for name, triples in ids.items():
        for h, r, t in triples:
            known.setdefault((int(h), int(r)), set()).add(int(t))
            if name == "train":
                train_known.setdefault((int(h), int(r)), set()).add(int(t))
    return KnowledgeGraph(entities, relations, ids, action_rel, action_ent, action_mask, known, train_known)


def load_graph(name, data_dir=DATA_DIR):
    """UMLS or Kinship from `examples/data/<name>/{train,valid,test}.txt`."""
    folder = pathlib.Path(data_dir) / name
    return build_graph({s: read_triples(folder / f"{s}.txt") for s in ("train", "valid", "test")})


def queries(kg, split):
    """Model inputs for every triple of a split: head, relation, tail ids and the
    multi-hot `exclude` of the query's other true tails: for the "train" split,
    `kg.train_tails` (the training triples only, as MINERVA's training batcher);
    for any other split, `kg.known_tails` (every split, the filtered setting)."""
    triples = kg.splits[split]
    known = kg.train_tails if split == "train" else kg.known_tails
    exclude = np.zeros((len(triples), kg.num_entities), np.float32)
    for i, (h, r, t) in enumerate(triples):
        others = known[(int(h), int(r))] - {int(t)}
        exclude[i, sorted(others)] = 1.0
    return {
        "head": triples[:, 0].copy(),
        "relation": triples[:, 1].copy(),
        "tail": triples[:, 2].copy(),
        "exclude": exclude,
    }


# -- the agent ---------------------------------------------------------------
class KGPolicy(keras.layers.Layer):
    """Embeddings, a GRU cell over the path and an MLP scoring a current
    entity's actions; the adjacency is held as constant tensors.

    The functional model calls it through `Start`, `HopLogits` and `Advance`;
    beam search and the walk call its methods directly."""

    def __init__(self, kg, dim=32, hidden=64, entity_embeddings=True, **kwargs):
        super().__init__(**kwargs)
        self.num_entities = kg.num_entities
        self.num_base = kg.num_base_relations
        self.no_op = kg.no_op
        self.action_rel = tf.constant(kg.action_rel)
        self.action_ent = tf.constant(kg.action_ent)
        self.action_mask = tf.constant(kg.action_mask)
        init = keras.initializers.GlorotUniform()
        # Without entity embeddings (MINERVA's `use_entity_embeddings=0`, its UMLS and Kinship setting) the
        # entities' vectors stay zero: the policy reads the relations of the path and of the actions only.
        self.entity_emb = keras.layers.Embedding(kg.num_entities, dim, embeddings_initializer=init if entity_embeddings
                                                 else "zeros", trainable=entity_embeddings, name="entity_emb")
        self.relation_emb = keras.layers.Embedding(len(kg.relations), dim, embeddings_initializer=init,
                                                   name="relation_emb")
        self.cell = keras.layers.GRUCell(hidden, name="path_cell")
        self.mlp = keras.layers.Dense(hidden, activation="relu", name="policy_hidden")
        self.query = keras.layers.Dense(2 * dim, name="policy_query")
        self.dim, self.hidden = dim, hidden

    def build(self, input_shape=None):
        self.entity_emb.build((None,))
        self.relation_emb.build((None,))
        self.cell.build((None, 2 * self.dim))
        self.mlp.build((None, self.hidden + 2 * self.dim))
        self.query.build((None, self.hidden))
        self.built = True

    def edge_input(self, relation, entity):
        return tf.concat([self.relation_emb(relation), self.entity_emb(entity)], axis=-1)

    def start(self, head, relation):
        """The path state after reading the query: (query relation, head entity)."""
        h0 = tf.zeros([tf.shape(head)[0], self.hidden])
        out, _ = self.cell(self.edge_input(relation, head), [h0])
        return out

    def logits(self, h, entity, relation):
        """`[B, A]` scores of the current entity's actions: the query vector
        dotted with each action's (relation, entity) embedding."""
        z = self.mlp(tf.concat([h, self.entity_emb(entity), self.relation_emb(relation)], axis=-1))
        q_rel, q_ent = tf.split(self.query(z), 2, axis=-1)
        s_rel = tf.matmul(q_rel, self.relation_emb.embeddings, transpose_b=True)
        s_ent = tf.matmul(q_ent, self.entity_emb.embeddings, transpose_b=True)
        rel, ent = tf.gather(self.action_rel, entity), tf.gather(self.action_ent, entity)
        return tf.gather(s_rel, rel, batch_dims=1) + tf.gather(s_ent, ent, batch_dims=1)

    def mask(self, entity, head, relation, tail, exclude, last):
        """`[B, A]` allowed actions: real edges, not the query edge (or its
        inverse), and at the last hop none into `exclude` (other true tails).
        A row left with nothing allows NO_OP (its answer is then wrong)."""
        rel, ent = tf.gather(self.action_rel, entity), tf.gather(self.action_ent, entity)
        allowed = tf.gather(self.action_mask, entity)
        col = lambda t: t[:, None]  # noqa: E731
        inverse = tf.where(relation < self.num_base, relation + self.num_base, relation - self.num_base)
        own = (col(entity) == col(head)) & (rel == col(relation)) & (ent == col(tail))
        own |= (col(entity) == col(tail)) & (rel == col(inverse)) & (ent == col(head))
        allowed &= ~own
        if last:
            allowed &= tf.gather(exclude, ent, batch_dims=1) <= 0.0
        stuck = ~tf.reduce_any(allowed, axis=1, keepdims=True)
        first = tf.range(tf.shape(allowed)[1])[None] == 0
        return allowed | (stuck & first)

    def advance(self, h, entity, action):
        """Takes action index `action` `[B]`: the new path state, entity and relation."""
        rel = tf.gather(tf.gather(self.action_rel, entity), action[:, None], batch_dims=1)[:, 0]
        ent = tf.gather(tf.gather(self.action_ent, entity), action[:, None], batch_dims=1)[:, 0]
        out, _ = self.cell(self.edge_input(rel, ent), [h])
        return out, ent, rel

    def call(self, inputs):
        return inputs


class Start(keras.layers.Layer):
    """`[head, relation] -> h`: the policy's initial path state."""

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def call(self, inputs):
        head, relation = inputs
        return self.policy.start(head, relation)


def drop_actions(mask, rate, seed):
    """`mask` (`[B, A]` bool) with each allowed action hidden with probability
    `rate` (`seed`: a `keras.random.SeedGenerator`); a row that would keep
    none keeps its whole mask. The noise is `keras_bpq.nodes.stateless_uniform`'s
    (Threefry under XLA): Keras' default algorithm compiles under XLA on CPU
    into a fusion that costs many times the rest of the step."""
    noise = keras_bpq.nodes.stateless_uniform(tf.shape(mask), tf.cast(seed.next(), tf.int32))
    kept = mask & (noise >= rate)
    return tf.where(tf.reduce_any(kept, axis=1, keepdims=True), kept, mask)


class HopLogits(keras.layers.Layer):
    """`[h, entity, head, relation, tail, exclude] -> (logits, mask)` of one hop.

    With `action_dropout > 0`, while training the mask also hides each allowed
    action with that probability (`drop_actions`, MultiHopKG's action dropout):
    the hop's Categorical is then the policy over the actions left, so every
    estimator's gradient is that of the expected cost under the dropout draws
    (MultiHopKG samples from the thinned policy but differentiates the whole
    one's log-probability, a biased gradient). Beam search and export read the
    policy's whole mask."""

    def __init__(self, policy, last, action_dropout=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.last = last
        self.action_dropout = action_dropout
        self.seed_generator = keras.random.SeedGenerator(seed) if action_dropout else None

    def call(self, inputs, training=None):
        h, entity, head, relation, tail, exclude = inputs
        logits = self.policy.logits(h, entity, relation)
        mask = self.policy.mask(entity, head, relation, tail, exclude, self.last)
        if training and self.action_dropout:
            mask = drop_actions(mask, self.action_dropout, self.seed_generator)
        return logits, mask


class Advance(keras.layers.Layer):
    """`[h, entity, one_hot_action] -> (h, next_entity)`."""

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def call(self, inputs):
        h, entity, action = inputs
        h, entity, _ = self.policy.advance(h, entity, tf.argmax(action, axis=-1, output_type=tf.int32))
        return h, entity


class TailHits(keras.layers.Layer):
    """`[entity, tail] -> [B, A]`: 1 for the entity's actions that lead to `tail`."""

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def call(self, inputs):
        entity, tail = inputs
        return tf.cast(tf.equal(tf.gather(self.policy.action_ent, entity), tail[:, None]), tf.float32)


class Miss(keras.layers.Layer):
    """`[B, 1] hit -> [B]` cost `1 - hit`."""

    def call(self, hit):
        return 1.0 - hit[:, 0]


class Answer(keras.layers.Layer):
    """`entity -> one_hot(entity)`, the model's output."""

    def __init__(self, num_entities, **kwargs):
        super().__init__(**kwargs)
        self.num_entities = num_entities

    def call(self, entity):
        return tf.one_hot(entity, self.num_entities)


def masked_entropy(logits, mask):
    """Entropy of the masked softmax, per row (masked actions add nothing)."""
    log_p = tf.nn.log_softmax(tf.where(mask, logits, -1e9))
    return -tf.reduce_sum(tf.where(mask, tf.exp(log_p) * log_p, 0.0), axis=-1)


class EntropyBonus(keras.layers.Layer):
    """`[logits, mask] -> logits`, adding the regularisation loss
    `-beta * mean_rows H(pi)` (`add_loss`): called at every hop, the bonus is
    `-beta * sum_t mean H(pi_t)`, differentiated through the logits only, as
    MINERVA does. `beta` is a non-trainable variable (`EntropyDecay` anneals it)."""

    def __init__(self, beta, **kwargs):
        super().__init__(**kwargs)
        self.initial_beta = float(beta)
        self.beta = self.add_weight(
            name="beta", shape=(), initializer=keras.initializers.Constant(beta), trainable=False
        )

    def call(self, inputs):
        logits, mask = inputs
        self.add_loss(-self.beta * tf.reduce_mean(masked_entropy(logits, mask)))
        return logits


@dataclasses.dataclass
class Agent:
    """The trainable model and the pieces beam search and export reuse."""

    model: object  # keras_bpq.BackpropQModel
    policy: KGPolicy
    kg: KnowledgeGraph
    hops: int
    entropy: object = None  # EntropyBonus or None
    # Compiled beam searches by (beam, pool, unique), filled by `beam_function`.
    beam_functions: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def build_agent(kg, hops=2, dim=32, hidden=64, seed=0, entropy_beta=0.0, action_dropout=0.0, entity_embeddings=True):
    """The agent as a functional `BackpropQModel`: a chain of `hops` masked
    Categorical nodes `hop_1..hop_T` and cost `miss` (with an entropy bonus on
    every hop's policy if beta > 0, a regularisation loss that every estimator
    shares; with `action_dropout`, `HopLogits`'s while training; without
    `entity_embeddings`, a policy that reads relations only); its output is
    the one-hot answer entity.

    `miss` is `1 - <last action, actions into the tail>` (a `Dot`), so the last
    hop's exact Q at all its actions is one gather per query
    (`keras_bpq.outcomes.DownstreamEvaluator`) rather than a pass per action."""
    keras.utils.set_random_seed(seed)
    inputs = {
        "head": keras.Input((), dtype="int32", name="head"),
        "relation": keras.Input((), dtype="int32", name="relation"),
        "tail": keras.Input((), dtype="int32", name="tail"),
        "exclude": keras.Input((kg.num_entities,), name="exclude"),
    }
    head, relation, tail, exclude = (inputs[k] for k in ("head", "relation", "tail", "exclude"))
    policy = KGPolicy(kg, dim, hidden, entity_embeddings, name="policy")
    policy.build()
    entropy = EntropyBonus(entropy_beta, name="entropy_bonus") if entropy_beta else None
    h, entity = Start(policy, name="start")([head, relation]), head
    for t in range(1, hops + 1):
        hop = HopLogits(policy, t == hops, action_dropout, seed=seed * 1000 + 100 + t, name=f"policy_{t}")
        logits, mask = hop([h, entity, head, relation, tail, exclude])
        if entropy is not None:
            logits = entropy([logits, mask])
        action = keras_bpq.Categorical(name=f"hop_{t}", seed=seed * 1000 + t)(logits, mask=mask)
        if t == hops:
            hits = TailHits(policy, name="tail_hits")([entity, tail])
            miss = Miss(name="miss")(keras.layers.Dot(axes=-1, name="hit")([action, hits]))
        h, entity = Advance(policy, name=f"move_{t}")([h, entity, action])
    answer = Answer(kg.num_entities, name="answer")(entity)
    model = keras_bpq.BackpropQModel(inputs=inputs, outputs=answer, costs={"miss": miss}, name="kg_agent")
    return Agent(model, policy, kg, hops, entropy)


@keras.saving.register_keras_serializable(package="kg_reasoning")
class KGCritic(keras.layers.Layer):
    """An all-outcomes critic network for the hops before the last
    (`keras_bpq.critics.AllOutcomes`): the critic's flat context (inputs
    `exclude, head, relation, tail` in `tf.nest` order, then the earlier hops'
    one-hot actions) -> `[B, A]`, the Q-value of every action of the current
    entity. Each action is scored by an MLP on `(next entity, query relation,
    tail, next entity excluded?)`; its first layer is split so that the
    next-entity part is computed once per entity, not once per action."""

    def __init__(self, action_ent, num_relations, dim=32, hidden=64, **kwargs):
        super().__init__(**kwargs)
        self.table = np.asarray(action_ent, np.int32)
        self.num_entities, self.num_actions = self.table.shape
        self.num_relations = int(num_relations)
        self.dim, self.hidden = int(dim), int(hidden)
        self.entity_emb = keras.layers.Embedding(self.num_entities, self.dim, name="entity_emb")
        self.relation_emb = keras.layers.Embedding(self.num_relations, self.dim, name="relation_emb")
        self.next_part = keras.layers.Dense(self.hidden, use_bias=False, name="next_part")
        self.query_part = keras.layers.Dense(self.hidden, name="query_part")
        self.out = keras.layers.Dense(1, name="out")

    def build(self, input_shape):
        self.entity_emb.build((None,))
        self.relation_emb.build((None,))
        self.next_part.build((None, self.dim))
        self.query_part.build((None, 2 * self.dim))
        self.excluded_part = self.add_weight(shape=(self.hidden,), initializer="glorot_uniform", name="excluded_part")
        self.out.build((None, self.hidden))
        self.built = True

    def call(self, features):
        e, a = self.num_entities, self.num_actions
        table = tf.constant(self.table)
        ids = tf.cast(tf.round(features[:, e : e + 3]), tf.int32)
        entity = ids[:, 0]
        earlier = features[:, e + 3 :]
        for i in range(earlier.shape[-1] // a):
            action = tf.argmax(earlier[:, i * a : (i + 1) * a], axis=-1, output_type=tf.int32)
            entity = tf.gather(tf.gather(table, entity), action[:, None], batch_dims=1)[:, 0]
        nxt = tf.gather(table, entity)  # [B, A]
        excluded = tf.gather(features[:, :e], nxt, batch_dims=1)
        per_entity = self.next_part(self.entity_emb.embeddings)  # [E, hidden]
        query = self.query_part(tf.concat([self.relation_emb(ids[:, 1]), self.entity_emb(ids[:, 2])], axis=-1))
        hidden = tf.nn.relu(tf.gather(per_entity, nxt) + query[:, None] + excluded[..., None] * self.excluded_part)
        return self.out(hidden)[..., 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_actions)

    def get_config(self):
        config = super().get_config()
        config.update(action_ent=self.table.tolist(), num_relations=self.num_relations, dim=self.dim, hidden=self.hidden)
        return config


def critics_for(agent, dim=CRITIC_DIM, hidden=CRITIC_HIDDEN):
    """`{hop_t: critic network}` KG-aware critics for every hop but the last
    (whose Q-values are exact: the cost re-evaluated). Each scores all of a
    hop's actions in one pass (`keras_bpq.critics.AllOutcomes`), once per
    distinct context (the rollouts of a query share hop 1's); `dim` and
    `hidden` are its `KGCritic`'s embedding size and width (the sizes
    benchmarks/kg_equal_time.py compares)."""
    kg = agent.kg
    return {
        f"hop_{t}": keras_bpq.critics.AllOutcomes(
            KGCritic(kg.action_ent, len(kg.relations), dim, hidden, name=f"kg_critic_{t}"),
            kg.max_actions, distinct=True, name=f"critic_{t}",
        )
        for t in range(1, agent.hops)
    }


def estimator_option(name):
    """The `compile(estimator=...)` value of a flag value: 'minerva' is
    reinforce with MINERVA's baseline decay and advantage standardisation;
    'critic_cv_nodev' is the default's `critic_cv` without the last hop's
    deviation in the earlier hops' signal (an ablation);
    'hop_1=critic_cv+hop_2=minerva' gives each hop its own."""
    if "=" in name:
        return dict((hop, estimator_option(value)) for hop, value in (p.split("=") for p in name.split("+")))
    if name == "minerva":
        return keras_bpq.estimators.Reinforce(decay=0.95, normalize=True)
    if name == "critic_cv_nodev":
        return keras_bpq.estimators.CriticCV(successor_deviations=False)
    return name


def critic_hops(agent, estimator):
    """The hops whose estimator (for this flag value) reads a critic."""
    option = estimator_option(estimator)
    return {
        info.name
        for info in agent.model.scg().nodes
        if keras_bpq.estimators.get(
            option.get(info.name, "auto") if isinstance(option, dict) else option, info, 2
        ).needs_critic
    }


def compile_agent(agent, estimator="auto", rollouts=20, learning_rate=1e-3, steps_per_execution=1,
                  critic_dim=CRITIC_DIM, critic_hidden=CRITIC_HIDDEN, **kwargs):
    """Compiles with Adam (clipnorm 5, as MINERVA), `num_samples=rollouts`, a
    Hits@1 metric (the fraction of rollouts ending at the tail) and, for the
    hops whose estimator reads a critic, `critics_for(agent, critic_dim,
    critic_hidden)`."""
    hops = critic_hops(agent, estimator)
    critics = {name: critic for name, critic in critics_for(agent, critic_dim, critic_hidden).items() if name in hops}
    extra = {"critics": critics} if critics else {}
    extra.update(kwargs)
    agent.model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=5.0),
        estimator=estimator_option(estimator),
        num_samples=rollouts,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="hits_at_1")],
        steps_per_execution=steps_per_execution,
        **extra,
    )


def jit_compile_option(value):
    """`compile_agent`'s keywords for a `--jit_compile` value: none for
    "auto" (Keras' own choice)."""
    return {} if value == "auto" else {"jit_compile": value == "true"}


def agent_from_flags(kg, estimator, seed, **compile_kwargs):
    """An agent on `kg` as the command line's flags say (`--hops`, `--dim`,
    `--hidden`, `--entropy_beta`, `--action_dropout`, `--entity_embeddings`),
    built from `seed` and compiled with `estimator` and the flags'
    `--rollouts`, `--learning_rate`, `--steps_per_execution`,
    `--critic_dim`, `--critic_hidden` and `--jit_compile` (`compile_agent`,
    which takes `compile_kwargs` too; they override the flags)."""
    agent = build_agent(kg, FLAGS.hops, FLAGS.dim, FLAGS.hidden, seed, FLAGS.entropy_beta, FLAGS.action_dropout,
                        FLAGS.entity_embeddings)
    options = {"critic_dim": FLAGS.critic_dim, "critic_hidden": FLAGS.critic_hidden,
               **jit_compile_option(FLAGS.jit_compile), **compile_kwargs}
    compile_agent(agent, estimator, FLAGS.rollouts, FLAGS.learning_rate, FLAGS.steps_per_execution, **options)
    return agent


def train_dataset(kg, batch_size, seed, split="train"):
    """Shuffled, repeated `(inputs, tail)` batches of the split's queries."""
    data = queries(kg, split)
    ds = tf.data.Dataset.from_tensor_slices((data, data["tail"]))
    ds = ds.shuffle(len(data["tail"]), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# -- beam search ---------------------------------------------------------------
POOLS = ("max", "sum")


def beam_search(policy, hops, beam, head, relation, tail=None, exclude=None, pool="max", unique=True):
    """In-graph beam search over the policy's log-probabilities.

    Hops `1..T-1` keep the `beam` most probable paths, `log pi(p) = sum_t log
    pi(a_t | s_t)`. At the last hop the candidates are every one-edge
    extension of the beam (`unique=True`, MultiHopKG's de-duplication by
    entity: the beam keeps the `beam` best *entities*) or only the `beam` most
    probable extensions (`unique=False`, MINERVA's beam, whose paths may all
    end at one entity). Each entity `e` is scored over the candidate paths
    `P(e)` ending at it: `max_{p in P(e)} log pi(p)` (`pool="max"`, MINERVA's
    and MultiHopKG's default) or `log sum_{p in P(e)} pi(p)` (`pool="sum"`,
    MINERVA's alternative: every path to `e` counts).

    Args: `head`, `relation` (and optionally `tail`, whose query edge is hidden,
    and `exclude` `[Q, E]`, other true tails: masked at the last hop and
    removed from the ranking) per query. Returns a dict: `answers` `[Q, E]`
    entity ids ranked by their score, `scores` `[Q, E]` (-inf for entities no
    beam reached), `path_relations` and `path_entities` `[Q, E, T]` (the most
    probable path to each ranked answer; -1 where unreached), and
    `entity_scores` `[Q, E]` in entity order.
    """
    if pool not in POOLS:
        raise ValueError(f"beam_search: pool must be one of {POOLS}, got {pool!r}.")
    head, relation = tf.cast(head, tf.int32), tf.cast(relation, tf.int32)
    num_q, num_e = tf.shape(head)[0], policy.num_entities
    tail = tf.fill([num_q], -1) if tail is None else tf.cast(tail, tf.int32)
    exclude = tf.zeros([num_q, num_e]) if exclude is None else tf.cast(exclude, tf.float32)
    rep = lambda t: tf.repeat(t, beam, axis=0)  # noqa: E731
    q_head, q_rel, q_tail, q_excl = rep(head), rep(relation), rep(tail), rep(exclude)
    h, entity = policy.start(q_head, q_rel), q_head
    score = tf.tile(tf.concat([[0.0], tf.fill([beam - 1], NEG_INF)], 0)[None], [num_q, 1])
    path_rel = tf.zeros([num_q * beam, 0], tf.int32)
    path_ent = tf.zeros([num_q * beam, 0], tf.int32)
    for t in range(1, hops + 1):
        mask = policy.mask(entity, q_head, q_rel, q_tail, q_excl, t == hops)
        log_p = tf.nn.log_softmax(tf.where(mask, policy.logits(h, entity, q_rel), -1e9))
        log_p = tf.reshape(tf.where(mask, log_p, NEG_INF), [num_q, beam, -1])
        total = tf.reshape(score[:, :, None] + log_p, [num_q, -1])  # [Q, beam * A]
        if t == hops:
            break
        score, index = tf.math.top_k(total, k=beam)
        num_a = tf.shape(log_p)[2]
        parent = tf.reshape(index // num_a + tf.range(num_q)[:, None] * beam, [-1])
        action = tf.reshape(index % num_a, [-1])
        h, entity, rel = policy.advance(tf.gather(h, parent), tf.gather(entity, parent), action)
        path_rel = tf.concat([tf.gather(path_rel, parent), rel[:, None]], axis=1)
        path_ent = tf.concat([tf.gather(path_ent, parent), entity[:, None]], axis=1)
    if unique:
        candidate = tf.tile(tf.range(tf.shape(total)[1])[None], [num_q, 1])
        candidate_score = total
    else:
        candidate_score, candidate = tf.math.top_k(total, k=beam)
    last = {
        "rel": tf.reshape(tf.gather(policy.action_rel, entity), [num_q, -1]),
        "ent": tf.reshape(tf.gather(policy.action_ent, entity), [num_q, -1]),
    }
    return rank_answers(candidate_score, candidate, last, path_rel, path_ent, exclude, num_e, beam, pool, unique)


def rank_answers(candidate_score, candidate, last, path_rel, path_ent, exclude, num_e, beam, pool, unique):
    """Pools the last hop's candidate paths by entity and ranks the entities.

    `candidate_score` `[Q, K]`: log-probabilities of candidate paths, each an
    index `candidate` `[Q, K]` into the flattened `[beam * A]` extensions of
    the beam, whose last edge is `last["rel"]`, `last["ent"]` `[Q, beam * A]`
    and whose earlier edges are `path_rel`, `path_ent` `[Q * beam, T - 1]`."""
    num_q, num_k = tf.shape(candidate_score)[0], tf.shape(candidate_score)[1]
    num_a = tf.shape(last["ent"])[1] // beam
    candidate_ent = tf.gather(last["ent"], candidate, batch_dims=1)
    flat = tf.reshape(candidate_score, [-1])
    segment = tf.reshape(tf.range(num_q)[:, None] * num_e + candidate_ent, [-1])
    alive = tf.math.is_finite(flat)
    top = tf.math.unsorted_segment_max(tf.where(alive, flat, NEG_INF), segment, num_q * num_e)
    top_here = tf.gather(top, segment)
    position = tf.where(alive & (flat >= top_here), tf.tile(tf.range(num_k), [num_q]), num_k)
    best = tf.reshape(tf.math.unsorted_segment_min(position, segment, num_q * num_e), [num_q, num_e])
    reached = best < num_k
    if pool == "sum":
        mass = tf.math.unsorted_segment_sum(tf.where(alive, tf.exp(flat - top_here), 0.0), segment, num_q * num_e)
        top = top + tf.math.log(tf.maximum(mass, 1.0))  # mass >= 1 wherever reached (the max path counts 1)
    entity_score = tf.where(reached & (exclude <= 0.0), tf.reshape(top, [num_q, num_e]), NEG_INF)
    if unique:
        _, kept = tf.math.top_k(entity_score, k=tf.minimum(beam, num_e))
        keep = tf.reduce_any(tf.equal(kept[:, :, None], tf.range(num_e)[None, None]), axis=1)
        entity_score = tf.where(keep, entity_score, NEG_INF)
    order = tf.argsort(entity_score, axis=1, direction="DESCENDING", stable=True)
    ranked_score = tf.gather(entity_score, order, batch_dims=1)
    found = tf.math.is_finite(ranked_score)
    index = tf.gather(candidate, tf.minimum(tf.gather(best, order, batch_dims=1), num_k - 1), batch_dims=1)
    parent = index // num_a + tf.range(num_q)[:, None] * beam
    rels = tf.concat([tf.gather(path_rel, parent), tf.gather(last["rel"], index, batch_dims=1)[..., None]], -1)
    ents = tf.concat([tf.gather(path_ent, parent), tf.gather(last["ent"], index, batch_dims=1)[..., None]], -1)
    return {
        "answers": order,
        "scores": ranked_score,
        "path_relations": tf.where(found[..., None], rels, -1),
        "path_entities": tf.where(found[..., None], ents, -1),
        "entity_scores": entity_score,
    }


def ranks(scores, tails):
    """Each query's rank of its answer: `scores` `[Q, E]` (entities no beam
    reached score -inf), `tails` `[Q]`. Entities tied with the answer share
    their mean rank, `1 + #higher + #tied others / 2` (the expected rank under
    a random order of the ties, PyKEEN's "realistic" rank), so a policy whose
    scores tie, one that reads relations only, gains nothing by the ties; an
    answer no beam reached ranks nowhere (`inf`)."""
    own = scores[np.arange(len(tails)), tails][:, None]
    rank = 1.0 + np.sum(scores > own, axis=1) + (np.sum(scores == own, axis=1) - 1) / 2.0
    return np.where(np.isfinite(own[:, 0]), rank, np.inf)


def evaluate(agent, split, beam=100, chunk=128, limit=None, pool="max", unique=True):
    """Filtered tail-only Hits@1/3/10 and MRR of beam search on a split (the
    answer's rank as `ranks` gives it: ties share their mean rank; one no beam
    reached has reciprocal rank 0), and `entities`: the mean number of
    distinct entities ranked per query."""
    data = queries(agent.kg, split)
    if limit:
        data = {k: v[:limit] for k, v in data.items()}
    search = beam_function(agent, beam, pool, unique)
    answer_ranks, counts = [], []
    for start in range(0, len(data["head"]), chunk):
        part = {k: tf.constant(v[start : start + chunk]) for k, v in data.items()}
        scores = search(part["head"], part["relation"], part["tail"], part["exclude"]).numpy()
        answer_ranks.append(ranks(scores, data["tail"][start : start + chunk]))
        counts.append(np.isfinite(scores).sum(axis=1))
    answer_ranks = np.concatenate(answer_ranks)
    metrics = {f"hits@{k}": float(np.mean(answer_ranks <= k)) for k in (1, 3, 10)}
    metrics["mrr"] = float(np.mean(1.0 / answer_ranks))
    metrics["entities"] = float(np.mean(np.concatenate(counts)))
    return metrics


def beam_function(agent, beam, pool="max", unique=True):
    """A cached `tf.function` `(head, relation, tail, exclude) -> entity scores [Q, E]`,
    traced for any number of queries once it has seen two (`reduce_retracing`:
    a split's last, shorter chunk and the next split reuse that trace)."""
    key = (beam, pool, bool(unique))
    if key not in agent.beam_functions:
        agent.beam_functions[key] = tf.function(
            lambda h, r, t, x: beam_search(agent.policy, agent.hops, beam, h, r, t, x, pool, unique)["entity_scores"],
            reduce_retracing=True,
        )
    return agent.beam_functions[key]


# -- training -------------------------------------------------------------------
class EntropyDecay(keras.callbacks.Callback):
    """`beta = beta_0 * rate ** (steps // period)` after every batch, from the
    model's own step counter (MINERVA: x0.9 every 200 steps)."""

    def __init__(self, bonus, period=200, rate=0.9):
        super().__init__()
        self.bonus, self.period, self.rate = bonus, period, rate

    def on_train_batch_end(self, batch, logs=None):
        steps = int(self.model.training_state.steps.numpy())
        self.bonus.beta.assign(self.bonus.initial_beta * self.rate ** (steps // self.period))


class DevEvaluation(keras.callbacks.Callback):
    """Beam-search dev metrics every epoch (= `eval_every` steps), with the
    training steps and training wall-clock (evaluation excluded) so far."""

    def __init__(self, agent, beam, steps_per_epoch, split="valid", verbose=True, pool="max", unique=True):
        super().__init__()
        self.agent, self.beam, self.steps_per_epoch = agent, beam, steps_per_epoch
        self.pool, self.unique = pool, unique
        self.split, self.verbose = split, verbose
        self.curve, self.train_seconds = [], 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.train_seconds += time.perf_counter() - self.started
        metrics = evaluate(self.agent, self.split, self.beam, pool=self.pool, unique=self.unique)
        point = {"step": (epoch + 1) * self.steps_per_epoch, "seconds": self.train_seconds, **metrics}
        point.update({f"train_{k}": float(v) for k, v in (logs or {}).items()})
        self.curve.append(point)
        if self.verbose:
            print(f"  dev@{point['step']}: hits@1 {metrics['hits@1']:.3f} mrr {metrics['mrr']:.3f}")


def train(agent, steps, batch_size, estimator, rollouts=20, learning_rate=1e-3, seed=0,
          eval_every=100, beam=100, steps_per_execution=10, verbose=1, pool="max", unique=True, jit_compile="auto",
          critic_dim=CRITIC_DIM, critic_hidden=CRITIC_HIDDEN):
    """Compiles and fits the agent, evaluating on dev every `eval_every` steps;
    returns the `DevEvaluation` callback (its `curve`). `jit_compile`: a
    `--jit_compile` value; `critic_dim`, `critic_hidden`: `critics_for`'s."""
    compile_agent(agent, estimator, rollouts, learning_rate, steps_per_execution, critic_dim, critic_hidden,
                  **jit_compile_option(jit_compile))
    dev = DevEvaluation(agent, beam, eval_every, verbose=bool(verbose), pool=pool, unique=unique)
    callbacks = [dev]
    if agent.entropy is not None:
        callbacks.append(EntropyDecay(agent.entropy))
    agent.model.fit(
        train_dataset(agent.kg, batch_size, seed), epochs=max(1, steps // eval_every),
        steps_per_epoch=eval_every, callbacks=callbacks, verbose=verbose,
    )
    return dev


# -- serving ----------------------------------------------------------------------
class ServedAgent(tf.Module):
    """The exported agent: `beam(head, relation)` and `walk(head, relation, seed)`."""

    def __init__(self, agent, beam, pool="max", unique=True):
        super().__init__()
        # Every variable the signatures read: `walk` runs the model's forward
        # pass, so the entropy bonus's `beta` too, not the policy's alone.
        self.model_variables = [v.value for v in agent.model.weights]
        self._agent, self._beam, self._pool, self._unique = agent, beam, pool, unique
        ids = tf.TensorSpec([None], tf.int32)
        self.beam = tf.function(self._beam_search, input_signature=[ids, ids])
        self.walk = tf.function(self._walk, input_signature=[ids, ids, tf.TensorSpec([None], tf.int64)])

    def _beam_search(self, head, relation):
        out = beam_search(self._agent.policy, self._agent.hops, self._beam, head, relation,
                          pool=self._pool, unique=self._unique)
        return {k: v for k, v in out.items() if k != "entity_scores"}

    def _walk(self, head, relation, seed):
        return sample_walk(self._agent, head, relation, seed)


def sample_walk(agent, head, relation, seed):
    """One walk per query drawn by the model's own nodes with per-example stateless
    seeds (`keras_bpq.graph.Recorder(seeds=...)`): relations and entities `[B, T]`,
    the answer `[B]` and the walk's log-probability `[B]`."""
    head, relation = tf.cast(head, tf.int32), tf.cast(relation, tf.int32)
    inputs = {
        "head": head, "relation": relation, "tail": tf.fill(tf.shape(head), -1),
        "exclude": tf.zeros([tf.shape(head)[0], agent.kg.num_entities]),
    }
    with graph_lib.Recorder(seeds=seed) as rec:
        agent.model(inputs, training=False)
    entity, rels, ents, log_p = head, [], [], 0.0
    for record in rec.nodes:
        log_p += record.log_prob()
        action = tf.argmax(record.sample, axis=-1, output_type=tf.int32)
        rel = tf.gather(tf.gather(agent.policy.action_rel, entity), action[:, None], batch_dims=1)[:, 0]
        entity = tf.gather(tf.gather(agent.policy.action_ent, entity), action[:, None], batch_dims=1)[:, 0]
        rels.append(rel)
        ents.append(entity)
    return {"relations": tf.stack(rels, 1), "entities": tf.stack(ents, 1), "answer": entity, "log_prob": log_p}


def export_agent(agent, path, beam=100, pool="max", unique=True):
    """Writes the agent as a SavedModel with signatures `beam` and `walk` (the
    adjacency is baked in as constants; no keras_bpq needed to serve it)."""
    module = ServedAgent(agent, beam, pool, unique)
    signatures = {"beam": module.beam.get_concrete_function(), "walk": module.walk.get_concrete_function()}
    with keras_bpq.saving.atomic_directory(path) as folder:  # never half written where a server looks
        tf.saved_model.save(module, folder, signatures=signatures)
    return module


# -- main ---------------------------------------------------------------------------
def run(dataset, estimator, steps, batch_size=256, rollouts=20, hops=2, beam=100, seed=0,
        learning_rate=1e-3, dim=32, hidden=64, entropy_beta=0.05, eval_every=100,
        steps_per_execution=10, verbose=1, pool="max", unique=True, action_dropout=0.0, entity_embeddings=True,
        jit_compile="auto", critic_dim=CRITIC_DIM, critic_hidden=CRITIC_HIDDEN):
    """Trains one agent and evaluates it on test; returns `(agent, result)`."""
    kg = load_graph(dataset)
    agent = build_agent(kg, hops, dim, hidden, seed, entropy_beta, action_dropout, entity_embeddings)
    start = time.perf_counter()
    dev = train(agent, steps, batch_size, estimator, rollouts, learning_rate, seed, eval_every, beam,
                steps_per_execution, verbose, pool, unique, jit_compile, critic_dim, critic_hidden)
    result = {
        "dataset": dataset, "estimator": estimator, "seed": seed, "steps": steps, "batch_size": batch_size,
        "rollouts": rollouts, "hops": hops, "beam": beam, "beam_pool": pool, "beam_unique": bool(unique),
        "entropy_beta": entropy_beta, "action_dropout": action_dropout, "entity_embeddings": bool(entity_embeddings),
        "jit_compile": jit_compile, "critic_dim": critic_dim, "critic_hidden": critic_hidden,
        "wall_seconds": time.perf_counter() - start, "train_seconds": dev.train_seconds,
        "steps_per_second": steps / max(dev.train_seconds, 1e-9),
        "curve": dev.curve, "test": evaluate(agent, "test", beam, pool=pool, unique=unique),
    }
    return agent, result


def main(argv):
    del argv
    agent, result = run(
        FLAGS.dataset, FLAGS.estimator, FLAGS.steps, FLAGS.batch_size, FLAGS.rollouts, FLAGS.hops,
        FLAGS.beam, FLAGS.seed, FLAGS.learning_rate, FLAGS.dim, FLAGS.hidden, FLAGS.entropy_beta,
        FLAGS.eval_every, FLAGS.steps_per_execution, pool=FLAGS.beam_pool, unique=FLAGS.beam_unique,
        action_dropout=FLAGS.action_dropout, entity_embeddings=FLAGS.entity_embeddings,
        jit_compile=FLAGS.jit_compile, critic_dim=FLAGS.critic_dim, critic_hidden=FLAGS.critic_hidden,
    )
    test = result["test"]
    print(
        f"{FLAGS.dataset} {FLAGS.estimator}: {result['steps_per_second']:.2f} steps/s; test "
        + " ".join(f"{k} {v:.3f}" for k, v in test.items())
    )
    if FLAGS.out_json:
        pathlib.Path(FLAGS.out_json).write_text(json.dumps(result, indent=1))
    if FLAGS.export_dir:
        export_agent(agent, FLAGS.export_dir, FLAGS.beam, FLAGS.beam_pool, FLAGS.beam_unique)
        print(f"Exported the agent (signatures 'beam', 'walk') to {FLAGS.export_dir}")


if __name__ == "__main__":
    app.run(main)
