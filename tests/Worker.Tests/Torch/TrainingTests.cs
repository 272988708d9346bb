using TorchApi = FineTune.Worker.Torch.Torch;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;

namespace FineTune.Worker.Tests.Torch;

[Collection(GlobalGeneratorCollection.Name)]
public sealed class TrainingTests
{
    private sealed class Mlp : Module
    {
        private readonly TestLinear _l1, _l2, _l3;
        public Mlp(Generator gen)
        {
            _l1 = RegisterModule("l1", new TestLinear(4, 32, gen));
            _l2 = RegisterModule("l2", new TestLinear(32, 32, gen));
            _l3 = RegisterModule("l3", new TestLinear(32, 1, gen));
        }
        public Tensor Forward(Tensor x) => _l3.Forward(_l2.Forward(_l1.Forward(x).Silu()).Gelu());
    }

    [Fact]
    public void MlpRegressionLossFallsWithAdamW()
    {
        TorchApi.ManualSeed(1);
        using var gen = new Generator(42);
        using var model = new Mlp(gen);
        Assert.Equal(["l1.weight", "l1.bias", "l2.weight", "l2.bias", "l3.weight", "l3.bias"], model.NamedParameters().Select(p => p.Name));
        using var x = DisposeScope.Keep(Tensor.Randn([256, 4], gen));
        using var w = DisposeScope.Keep(Tensor.From(new float[] { 1.5f, -2f, 0.5f, 1f }, 4, 1));
        using var y = DisposeScope.Keep(x.MatMul(w).Sin());
        var decay = model.Parameters().Where(p => p.Dim == 2).ToList();
        var noDecay = model.Parameters().Where(p => p.Dim == 1).ToList();
        using var opt = new AdamW([new ParamGroup("decay", decay, 1e-2, 0.01), new ParamGroup("no_decay", noDecay, 1e-2)]);
        double first = 0, last = 0;
        for (var step = 0; step < 300; step++)
        {
            using var scope = DisposeScope.Begin();
            var loss = (model.Forward(x) - y).Square().Mean();
            loss.Backward();
            GradClip.ClipGradNorm(model.Parameters(), 1.0);
            opt.SetLearningRateFactor(LrSchedule.Factor("cosine", step, 300, 20, 0.1));
            opt.Step();
            opt.ZeroGrad();
            var v = loss.ItemDouble();
            if (step == 0) first = v;
            last = v;
        }
        Assert.True(last < 0.2 * first, $"loss {first} -> {last}");
    }

    /// <summary>One causal self-attention block learning to copy the previous token.</summary>
    private sealed class AttentionBlock : Module
    {
        private const int Heads = 2, HeadDim = 8, Model = Heads * HeadDim;
        private readonly Tensor _embedding, _position, _normWeight;
        private readonly TestLinear _qkv, _out, _head;

        public AttentionBlock(int vocab, int maxLen, Generator gen)
        {
            using (DisposeScope.Begin())
            {
                _embedding = RegisterParameter("embedding", Tensor.Randn([vocab, Model], gen) * 0.5);
                _position = RegisterParameter("position", Tensor.Randn([maxLen, Model], gen) * 0.5);
                _normWeight = RegisterParameter("norm", Tensor.Ones([Model]));
            }
            _qkv = RegisterModule("qkv", new TestLinear(Model, 3 * Model, gen));
            _out = RegisterModule("out", new TestLinear(Model, Model, gen));
            _head = RegisterModule("head", new TestLinear(Model, vocab, gen));
        }

        public Tensor Forward(Tensor ids)
        {
            var (b, t) = (ids.Size(0), ids.Size(1));
            var h = F.Embedding(_embedding, ids) + _position.Narrow(0, 0, t).Unsqueeze(0);
            var qkv = _qkv.Forward(F.RmsNorm(h, _normWeight, 1e-6)).View(b, t, 3, Heads, HeadDim).Permute(2, 0, 3, 1, 4);
            var parts = qkv.Chunk(3, 0);
            var attn = F.ScaledDotProductAttention(parts[0].Squeeze(0), parts[1].Squeeze(0), parts[2].Squeeze(0), isCausal: true);
            h = h + _out.Forward(attn.Transpose(1, 2).Reshape(b, t, Model));
            return _head.Forward(h);
        }
    }

    [Fact]
    public void TinyAttentionBlockLearnsToCopyThePreviousToken()
    {
        const int vocab = 8, len = 10, batch = 32;
        using var gen = new Generator(7);
        using var model = new AttentionBlock(vocab, len, gen);
        using var opt = new AdamW([new ParamGroup("all", model.Parameters().ToList(), 1e-2)]);
        double first = 0, last = 0;
        for (var step = 0; step < 200; step++)
        {
            using var scope = DisposeScope.Begin();
            var ids = Tensor.RandInt(0, vocab, [batch, len], gen);
            var logits = model.Forward(ids).Narrow(1, 1, len - 1).Reshape(-1, vocab);
            var targets = ids.Narrow(1, 0, len - 1).Reshape(-1);
            var loss = F.CrossEntropy(logits, targets);
            loss.Backward();
            opt.Step();
            opt.ZeroGrad();
            if (step == 0) first = loss.ItemDouble();
            last = loss.ItemDouble();
        }
        Assert.True(last < 0.3 * first, $"loss {first} -> {last}");
    }
}
