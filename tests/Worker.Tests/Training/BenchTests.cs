using System.Text.Json.Nodes;
using FineTune.Worker.Torch;
using FineTune.Worker.Tools;

namespace FineTune.Worker.Tests.Training;

/// <summary>Smoke test of <c>FineTune.Worker bench</c> on the tiny preset: it runs and reports finite numbers and its
/// table. No timing is asserted (speed is what the benchmark measures, on a quiet machine).</summary>
[Collection(GlobalGeneratorCollection.Name)]
public sealed class BenchTests
{
    [Fact]
    public async Task Bench_runs_micro_and_two_training_steps_for_lora_and_bone_and_writes_json_and_table()
    {
        var dir = TestData.TempDir("bench");
        var json = Path.Combine(dir, "bench.json");
        var md = Path.Combine(dir, "bench.md");
        var init = Path.Combine(dir, "init");
        var rc = await BenchCommand.RunAsync([
            "all", "--device", TestData.Device.ToString(), "--quick", "--size", "256", "--cpu-size", "64",
            "--preset", "tiny", "--batch", "2", "--seq", "32", "--warmup", "0", "--steps", "2",
            "--configs", "lora,bone,lora+gc,nosuch", "--json", json, "--md", md, "--init-dir", init,
        ]);
        Assert.Equal(0, rc);

        var root = JsonNode.Parse(File.ReadAllText(json))!;
        var overhead = root["micro"]!["op_overhead_cpu_us"]!.AsObject();
        Assert.All(overhead, kv => Assert.True(BenchCommand.Number(kv.Value) > 0, kv.Key));
        Assert.True(BenchCommand.Number(root["micro"]!["matmul_fp32_cpu_gflops"]) > 0);

        var train = root["train"]!;
        Assert.Matches("^128:[0-9a-f]{16}$", (string)train["data_check"]!);   // (0 + 2 steps) x 2 rows x 32 tokens
        var rows = train["results"]!.AsArray().Select(r => r!.AsObject()).ToDictionary(r => (string)r["config"]!);
        foreach (var name in new[] { "lora", "bone", "lora+gc" })
        {
            var r = rows[name];
            Assert.Equal("ok", (string)r["status"]!);
            Assert.True(BenchCommand.Number(r["tokens_per_s"]) > 0, name);
            Assert.True(BenchCommand.Number(r["trainable_params"]) > 0, name);
            Assert.True(BenchCommand.Number(r["mfu"]) > 0, name);
            var losses = r["losses"]!.AsArray().Select(BenchCommand.Number).ToList();
            Assert.Equal(2, losses.Count);
            Assert.All(losses, l => Assert.InRange(l!.Value, 0.1, 20));
            Assert.True(File.Exists(Path.Combine(init, name.Replace('+', '_'), "adapter_model.safetensors")), name);
        }
        // Same seed, same data, zero-initialised adapters: the first step's loss does not depend on the method.
        Assert.Equal(BenchCommand.Number(rows["lora"]["losses"]![0]), BenchCommand.Number(rows["bone"]["losses"]![0]));
        Assert.Equal("skipped", (string)rows["nosuch"]["status"]!);
        Assert.Contains("not registered", (string)rows["nosuch"]["note"]!);

        using (var f = SafetensorsFile.Open(Path.Combine(init, "lora", "adapter_model.safetensors")))
            Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", f.Entries.Keys);
        Assert.True(File.Exists(Path.Combine(init, "lora", "bench_init.json")));
        var table = File.ReadAllText(md);
        Assert.Contains("| lora | ok |", table);
        Assert.Contains("| bone | ok |", table);
        Assert.Contains("| nosuch | skipped |", table);
    }

    [Fact]
    public void Bench_data_is_the_documented_generator()
    {
        // The values peft_bench.py's generator gives for seed 1234, vocabulary 128256 (checked there too).
        Assert.Equal([81550, 19432, 63365, 101408, 106859, 103596, 84177, 95041], BenchData.Tokens(1234, 8, 128256));
        Assert.NotEqual(BenchData.Tokens(1234, 8, 128256), BenchData.Tokens(1235, 8, 128256));
    }

    [Fact]
    public async Task Bad_options_are_a_usage_error()
    {
        Assert.Equal(2, await BenchCommand.RunAsync(["train", "--steps", "zero"]));
        Assert.Equal(2, await BenchCommand.RunAsync(["sideways"]));
        Assert.Equal(2, await BenchCommand.RunAsync(["train", "--configs", "lora+fast"]));
    }
}
