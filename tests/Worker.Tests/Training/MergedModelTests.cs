using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

public sealed class MergedModelTests
{
    /// <summary>A copy of the tiny model stored in bf16, as most real checkpoints are.</summary>
    private static string Bf16Model()
    {
        var dir = TestData.TempDir("tiny-bf16");
        File.Copy(Path.Combine(TestData.TinyModelDir, "config.json"), Path.Combine(dir, "config.json"));
        var weights = Safetensors.Load(Path.Combine(TestData.TinyModelDir, "model.safetensors"));
        Safetensors.Save(Path.Combine(dir, "model.safetensors"), weights, null, _ => ScalarType.BFloat16);
        foreach (var t in weights.Values) t.Dispose();
        return dir;
    }

    [Fact]
    public void Merged_folder_keeps_the_base_dtype_and_leaves_the_model_unmerged()
    {
        var baseDir = Bf16Model();
        var outDir = TestData.TempDir("merged-bf16");
        using var model = Llama.Load(baseDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new DoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj", "down_proj"] }, model, 3);
        TestData.Randomize(method, 9);
        using var scope = DisposeScope.Begin();
        var ids = MethodTests.Input();
        var adapted = model.Forward(ids);

        var files = MergedModel.Write(outDir, model, method, baseDir, out var info);
        Assert.False(method.Merged);
        Assert.True(TestData.MaxAbsDiff(model.Forward(ids), adapted) < 1e-5);   // unmerged again, up to rounding
        Assert.Equal(["merged/model.safetensors", "merged/config.json"], files);
        Assert.Equal(["BF16"], info["dtypes"]!.AsArray().Select(n => (string)n!));
        using (var f = SafetensorsFile.Open(Path.Combine(outDir, "merged", "model.safetensors")))
        {
            Assert.All(f.Entries.Values, e => Assert.Equal("BF16", e.DType));
            Assert.Equal(MergedModel.BaseDTypes(baseDir).Keys.Order(), f.Entries.Keys.Order());
        }
        // bf16 keeps ~3 significant digits: the merged model agrees with the adapter up to that rounding.
        using var merged = Llama.Load(Path.Combine(outDir, "merged"), Device.Cpu, ScalarType.Float32);
        var diff = TestData.MaxAbsDiff(merged.Forward(ids), adapted);
        Assert.True(diff < 2e-2 * adapted.Abs().Max().ItemFloat(), $"merged bf16 model is off by {diff}");
        using var plain = Llama.Load(baseDir, Device.Cpu, ScalarType.Float32);
        Assert.True(TestData.MaxAbsDiff(plain.Forward(ids), adapted) > 10 * diff, "the adapter changed too little to tell");
    }

    [Fact]
    public void Free_space_of_the_artifact_folder_is_known()
    {
        var dir = TestData.TempDir("free");
        var free = MergedModel.FreeBytes(dir);
        Assert.NotNull(free);
        Assert.InRange(free!.Value, 1, new DriveInfo("/").TotalSize * 4);
    }

    [Fact]
    public void Sliced_writes_produce_the_same_file()
    {
        using var gen = new Generator(2);
        using var scope = DisposeScope.Begin();
        var tensors = new Dictionary<string, Tensor>
        {
            ["big"] = Tensor.Randn([37, 5, 3], gen), ["vec"] = Tensor.Randn([11], gen), ["scalar"] = Tensor.Full([], 3.5),
        };
        var dir = TestData.TempDir("sliced");
        Safetensors.Save(Path.Combine(dir, "whole.safetensors"), tensors, null, _ => ScalarType.BFloat16);
        Safetensors.Save(Path.Combine(dir, "sliced.safetensors"), tensors, null, _ => ScalarType.BFloat16, sliceBytes: 64);
        Assert.Equal(File.ReadAllBytes(Path.Combine(dir, "whole.safetensors")), File.ReadAllBytes(Path.Combine(dir, "sliced.safetensors")));
        var back = Safetensors.Load(Path.Combine(dir, "sliced.safetensors"));
        Assert.Equal(ScalarType.BFloat16, back["big"].DType);
        Assert.True(TestData.MaxAbsDiff(back["big"].To(ScalarType.Float32), tensors["big"]) < 2e-2);
    }
}
