using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Tools;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>The `parity` subcommand on the CPU: the files tests/parity/ reads on the GPU host.</summary>
public sealed class ParityCommandTests
{
    [Fact]
    public void Writes_base_and_per_method_logits_and_adapter_folders()
    {
        var model = TestData.WriteModel("parity-qwen", seed: 21, TinyModel.DefaultConfig with
        {
            Architectures = ["Qwen2ForCausalLM"], ModelType = "qwen2", TieWordEmbeddings = true,
        });
        var dir = TestData.TempDir("parity-out");
        var ids = Path.Combine(dir, "ids.json");
        File.WriteAllText(ids, "[[256, 72, 101, 108, 108, 111, 33, 10], [256, 1, 2, 3, 4, 5, 6, 7]]");
        var outDir = Path.Combine(dir, "out");

        Assert.Equal(0, ParityCommand.Run(["--model", model, "--ids", ids, "--out", outDir, "--seed", "7"]));

        var manifest = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "manifest.json")))!;
        Assert.Equal("Qwen2ForCausalLM", manifest["architecture"]!.GetValue<string>());
        using var scope = DisposeScope.Begin();
        var baseLogits = Safetensors.Load(Path.Combine(outDir, "base.logits.safetensors"))["logits"];
        Assert.Equal(new long[] { 2, 8, 259 }, baseLogits.Shape);
        Assert.Equal(ScalarType.Float32, baseLogits.DType);

        var methods = manifest["methods"]!.AsArray().ToDictionary(m => m!["type"]!.GetValue<string>(), m => m!);
        // Every registered method the worker trains is there, or skipped with a reason.
        var skipped = manifest["skipped"]!.AsArray().Select(s => s!["type"]!.GetValue<string>()).ToHashSet();
        Assert.All(MethodSpec.KnownTypes, t => Assert.True(methods.ContainsKey(t) || skipped.Contains(t), t));
        foreach (var (type, entry) in methods)
        {
            var adapter = Path.Combine(outDir, "adapters", type);
            Assert.True(File.Exists(Path.Combine(adapter, "adapter_config.json")), type);
            Assert.True(File.Exists(Path.Combine(adapter, "adapter_model.safetensors")), type);
            Assert.Equal(MethodSpec.AllModules, entry["options"]!["targetModules"]!.AsArray().Select(m => m!.GetValue<string>()));
            var logits = Safetensors.Load(Path.Combine(outDir, $"{type}.logits.safetensors"))["logits"];
            Assert.True(TestData.MaxAbsDiff(logits, baseLogits) > 1e-3, $"{type}: the random adapter must change the logits");
            if (entry["lora_logits"] is null) continue;
            Assert.True(File.Exists(Path.Combine(adapter, "lora", "adapter_model.safetensors")), type);
            var viaLora = Safetensors.Load(Path.Combine(outDir, entry["lora_logits"]!.GetValue<string>()))["logits"];
            if (entry["export"]?["exact"]?.GetValue<bool>() == true)
                Assert.True(TestData.MaxAbsDiff(logits, viaLora) < 1e-4, $"{type}: its exact lora/ export must give the same logits");
        }
        Assert.Contains("lora", methods.Keys);
        Assert.Contains("bone", methods.Keys);
        Assert.NotNull(methods["bone"]["lora_logits"]);
    }

    [Fact]
    public void Options_are_fitted_to_small_models_and_bad_arguments_are_usage_errors()
    {
        var shapes = TinyModel.DefaultConfig.LayerLinears();
        var bone = (BoneMethod)ParityCommand.Fit(new BoneMethod { R = 512 }, shapes);
        Assert.Equal(64, bone.R);   // 512 → 256 → 128 → 64: the first that fits the 64-wide inputs
        Assert.Empty(bone.ValidateShapes(shapes));
        Assert.Equal(2, ParityCommand.Run(["--model", "x"]));
        var dir = TestData.TempDir("parity-bad");
        File.WriteAllText(Path.Combine(dir, "ids.json"), "[[1, 2], [3]]");
        Assert.Equal(1, ParityCommand.Run(["--model", TestData.TinyModelDir, "--ids", Path.Combine(dir, "ids.json"), "--out", dir]));
    }
}
