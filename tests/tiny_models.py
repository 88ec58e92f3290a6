"""Tiny random models of every supported architecture, built from transformers config classes."""

import torch
import transformers as T

VOCAB = 30522  # all-MiniLM's WordPiece vocabulary, so the real tokenizer can drive any tiny model
H, FF, LAYERS, HEADS = 64, 128, 2, 4

CONFIGS = {
    "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, max_position_embeddings=128),
    "roberta": lambda: T.RobertaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       max_position_embeddings=130),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=128),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=H, ffn_dim=FF, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, max_position_embeddings=128, word_embed_proj_dim=H),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        max_position_embeddings=128),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                                 rotary_dim=8),
    "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                                   max_position_embeddings=128),
    "qwen2": lambda: T.Qwen2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                                   max_position_embeddings=128),
}

CAUSAL = {"gpt2": T.GPT2LMHeadModel, "opt": T.OPTForCausalLM, "gpt_neox": T.GPTNeoXForCausalLM,
          "gptj": T.GPTJForCausalLM, "llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM}
ENCODER = {"bert": T.BertModel, "roberta": T.RobertaModel}
# linears per block the adapters must find
LINEARS_PER_BLOCK = {"bert": 6, "roberta": 6, "gpt2": 4, "opt": 6, "gpt_neox": 4, "gptj": 6, "llama": 7,
                     "qwen2": 7}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = CAUSAL.get(arch) or ENCODER[arch]
    return cls(CONFIGS[arch]()).eval()


def tiny_input(n: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, VOCAB, (n, t), generator=g)


def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state
