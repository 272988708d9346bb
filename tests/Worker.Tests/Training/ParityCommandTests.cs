using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Tools;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>
/// The `parity` subcommand on the CPU: the files tests/parity/check_logits.py and check_peft.py read on the GPU host.
/// Here our own loaders check that every folder reproduces the logits it is stored with (native form, top-k form,
/// lora/, merged/) and that the SVD errors metadata.json records are those of the files; PEFT and transformers do the
/// same on the GPU host.
/// </summary>
public sealed class ParityCommandTests
{
    private static string Ids(string dir)
    {
        var ids = Path.Combine(dir, "ids.json");
        File.WriteAllText(ids, "[[256, 72, 101, 108, 108, 111, 33, 10], [256, 1, 2, 3, 4, 5, 6, 7]]");
        return ids;
    }

    [Fact]
    public void Every_case_writes_folders_that_reproduce_its_logits()
    {
        // Qwen2 shapes: q/k/v biases, tied embeddings, intermediate 176 (Bat and VB-LoRA sizes get halved to fit).
        var models = TestData.TempDir("parity-models");
        var modelDir = Path.Combine(models, "qwen");
        TinyModel.Write(modelDir, seed: 21, TinyModel.DefaultConfig with
        {
            Architectures = ["Qwen2ForCausalLM"], ModelType = "qwen2", TieWordEmbeddings = true,
        });
        Ids(modelDir);
        var root = TestData.TempDir("parity-out");

        Assert.Equal(0, ParityCommand.Run(["--models", models, "--out", root, "--seed", "7"]));

        var outDir = Path.Combine(root, "qwen");
        var manifest = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "manifest.json")))!;
        Assert.Equal("Qwen2ForCausalLM", (string)manifest["architecture"]!);
        Assert.Empty(manifest["skipped"]!.AsArray());
        Assert.Empty(manifest["failed"]!.AsArray());
        var cases = manifest["cases"]!.AsArray().ToDictionary(c => (string)c!["name"]!, c => c!);
        Assert.Equal(ParityCommand.Cases.Select(c => c.Name), cases.Keys);
        // A method registered without a parity case fails here.
        Assert.All(MethodSpec.KnownTypes, t => Assert.Contains(ParityCommand.Cases, c => c.Method.Type == t));

        using var scope = DisposeScope.Begin();
        var baseLogits = Load(outDir, (string)manifest["base_logits"]!);
        Assert.Equal(new long[] { 2, 8, 259 }, baseLogits.Shape);
        Assert.Equal(ScalarType.Float32, baseLogits.DType);
        using var ids = Tensor.From(new long[] { 256, 72, 101, 108, 108, 111, 33, 10, 256, 1, 2, 3, 4, 5, 6, 7 }, 2, 8);
        var baseWeights = Safetensors.Load(Path.Combine(modelDir, "model.safetensors"));

        foreach (var c in ParityCommand.Cases)
        {
            var entry = cases[c.Name];
            var adapter = Path.Combine(outDir, (string)entry["adapter_dir"]!);
            var spec = System.Text.Json.JsonSerializer.Deserialize<MethodSpec>(entry["options"]!.ToJsonString(), FineTune.Domain.DomainJson.Options)!;
            Assert.Equal(MethodSpec.AllModules, spec.TargetModules);
            var logits = Load(outDir, (string)entry["logits"]!);
            Assert.True(TestData.MaxAbsDiff(logits, baseLogits) > 1e-3, $"{c.Name}: the perturbed adapter must change the logits");

            // Native form (VB-LoRA's top-k form too) loaded back by us onto the original base: the same logits.
            using (var model = Llama.Load(modelDir, Device.Cpu, ScalarType.Float32))
            using (var method = AdapterMethods.Attach(spec, model, seed: 99))
            {
                method.Load(adapter);
                method.Train(false);
                Assert.True(TestData.MaxAbsDiff(model.Forward(ids), logits) < 1e-5, $"{c.Name}: native");
            }
            // merged/ is a plain model folder with the same outputs, in the base's dtype (fp32 here).
            Assert.Equal(["F32"], entry["merged"]!["dtypes"]!.AsArray().Select(d => (string)d!));
            var merged = Load(outDir, (string)entry["merged_logits"]!);
            Assert.True(TestData.MaxAbsDiff(merged, logits) < 1e-4, $"{c.Name}: merged/");

            // metadata.json records what the manifest says about lora/ and merged/.
            var metadata = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "metadata.json")))!;
            Assert.True(JsonNode.DeepEquals(metadata["lora_export"], entry["export"]), c.Name);
            Assert.True(JsonNode.DeepEquals(metadata["merged"], entry["merged"]), c.Name);
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!;
            Assert.Equal((string)config["peft_type"]!, (string)entry["peft_type"]!);

            var viaLora = Load(outDir, (string)entry["lora_logits"]!);
            var export = entry["export"]!;
            if ((bool)export["exact"]!)
            {
                Assert.True(TestData.MaxAbsDiff(viaLora, logits) < 1e-4, $"{c.Name}: its exact lora/ export must give the same logits");
                continue;
            }
            // An SVD export: the error recorded per module is ‖ΔW − B·A‖_F / ‖ΔW‖_F with ΔW = merged/ − base.
            var recorded = export["relative_error"]!.AsObject();
            Assert.Equal(spec.TargetModules.Length * 2, recorded.Count);
            var lora = Safetensors.Load(Path.Combine(adapter, "lora", "adapter_model.safetensors"));
            var mergedWeights = Safetensors.Load(Path.Combine(adapter, "merged", "model.safetensors"));
            foreach (var (path, error) in recorded)
            {
                var delta = mergedWeights[$"{path}.weight"] - baseWeights[$"{path}.weight"];
                var product = lora[$"{AdapterMethodBase.Prefix}{path}.lora_B.weight"].MatMul(lora[$"{AdapterMethodBase.Prefix}{path}.lora_A.weight"]);
                var ours = (delta - product).Norm().ItemDouble() / delta.Norm().ItemDouble();
                Assert.InRange(ours, (double)error! - 1e-4, (double)error! + 1e-4);
            }
            Assert.InRange((double)export["max_relative_error"]!, 1e-6, 1.0);
        }

        // The variants are what PEFT distinguishes.
        Assert.Equal("pissa", (string)Config(outDir, "lora-pissa")["init_lora_weights"]!);
        Assert.Equal("olora", (string)Config(outDir, "lora-olora")["init_lora_weights"]!);
        Assert.Equal("gaussian", (string)Config(outDir, "lora-gaussian")["init_lora_weights"]!);
        Assert.True((bool)Config(outDir, "lora-rslora")["use_rslora"]!);
        Assert.True((bool)Config(outDir, "dora")["use_dora"]!);
        Assert.Equal("mini", (string)Config(outDir, "bone-mini")["init_weights"]!);
        Assert.Equal("bat", (string)Config(outDir, "bat")["init_weights"]!);
        Assert.Equal(["MISS", "MISS", "MISS", "BAT", "SBORA", "SBORA", "XGBLORA"],
            new[] { "bone", "bone-mini", "bat", "bat-row", "sbora-fa", "sbora-fb", "xgblora" }.Select(n => (string)cases[n]["peft_type"]!));
        Assert.Equal("fb", (string)Config(outDir, "sbora-fb")["variant"]!);
        using (var topk = SafetensorsFile.Open(Path.Combine(outDir, "adapters", "vblora-topk", "adapter_model.safetensors")))
            Assert.Contains(topk.Entries.Keys, k => k.EndsWith("vblora_logits_A_topk_indices", StringComparison.Ordinal));
        // Three merged rounds plus the last booster: the export sums several boosters per module.
        Assert.True((long)cases["xgblora"]["export"]!["r"]! >= 2);
    }

    private static Tensor Load(string dir, string file) => Safetensors.Load(Path.Combine(dir, file))["logits"];

    private static JsonNode Config(string outDir, string name) =>
        JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapters", name, "adapter_config.json")))!;

    [Fact]
    public void A_bf16_sharded_base_gives_a_bf16_merged_folder_and_bad_arguments_are_usage_errors()
    {
        var model = TestData.WriteModel("parity-bf16", seed: 5, shards: 2, dtype: ScalarType.BFloat16);
        var dir = TestData.TempDir("parity-bf16-out");
        Assert.Equal(0, ParityCommand.Run(["--model", model, "--ids", Ids(dir), "--out", dir, "--cases", "lora-pissa,bat"]));
        var manifest = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "manifest.json")))!;
        // A case by name, a method by type (all its cases).
        Assert.Equal(["lora-pissa", "bat", "bat-row"], manifest["cases"]!.AsArray().Select(c => (string)c!["name"]!));
        using var scope = DisposeScope.Begin();
        foreach (var entry in manifest["cases"]!.AsArray())
        {
            Assert.Equal(["BF16"], entry!["merged"]!["dtypes"]!.AsArray().Select(d => (string)d!));
            var logits = Load(dir, (string)entry["logits"]!);
            var diff = TestData.MaxAbsDiff(Load(dir, (string)entry["merged_logits"]!), logits);
            // Stored in bf16: close to the adapter's logits, but rounded (check_peft.py reports this as approx).
            Assert.InRange(diff, 1e-7, 2e-2 * logits.Abs().Max().ItemFloat());
        }

        Assert.Equal(2, ParityCommand.Run(["--model", "x"]));
        Assert.Equal(2, ParityCommand.Run(["--models", dir, "--model", "x", "--out", dir]));
        Assert.Equal(2, ParityCommand.Run(["--model", model, "--ids", Path.Combine(dir, "ids.json"), "--out", dir, "--cases", "nope"]));
        File.WriteAllText(Path.Combine(dir, "bad.json"), "[[1, 2], [3]]");
        Assert.Equal(1, ParityCommand.Run(["--model", model, "--ids", Path.Combine(dir, "bad.json"), "--out", dir]));
        Assert.Equal(1, ParityCommand.Run(["--models", TestData.TempDir("parity-empty"), "--out", dir]));
    }

    [Fact]
    public void Options_are_fitted_to_small_models()
    {
        var shapes = TinyModel.DefaultConfig.LayerLinears();
        var bone = (BoneMethod)ParityCommand.Fit(new BoneMethod { R = 512 }, shapes);
        Assert.Equal(64, bone.R);   // 512 → 256 → 128 → 64: the first that fits the 64-wide inputs
        Assert.Empty(bone.ValidateShapes(shapes));
        var bat = (BatMethod)ParityCommand.Fit(new BatMethod(), shapes);
        Assert.Equal(16, bat.R);    // 64 → 32 → 16: the first that divides the 176-wide MLP
        Assert.Throws<ArgumentException>(() => ParityCommand.Fit(new BoneMethod { Mode = "odd" }, shapes));
    }
}
