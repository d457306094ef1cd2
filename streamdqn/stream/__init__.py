"""The stream stage: bytes to replay rows. Numpy only: no broker client, no torch, no onnx.

    sources   Record, DeadLetter, the source/sink protocols, in-memory source and sink
    wire      the event schema and decode(bytes) -> events and rejects
    features  the 30-dim feature spec and the running normalizer
    rewards   the reward table
    episodes  episodes to transitions
    scoring   how a policy's decisions on recorded episodes score under the reward table
    pipeline  records -> decode -> rate cap -> episodes -> replay, with every record accounted for
"""
