using System.Text;
using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Torch;

public sealed class SafetensorsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("st-test-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Dictionary<string, Tensor> Sample()
    {
        using var gen = new Generator(9);
        return new Dictionary<string, Tensor>
        {
            ["w.f32"] = Tensor.Randn([3, 5], gen),
            ["w.bf16"] = Tensor.Randn([4, 2], gen).To(ScalarType.BFloat16),
            ["w.f16"] = Tensor.Randn([7], gen).To(ScalarType.Float16),
            ["ids.i64"] = Tensor.From(new long[] { long.MinValue, -1, 0, 1, long.MaxValue }),
            ["scalar"] = Tensor.Scalar(2.5),
            ["empty"] = Tensor.Zeros([0, 3]),
        };
    }

    [Fact]
    public void RoundTripsBitExactly()
    {
        using var scope = DisposeScope.Begin();
        var tensors = Sample();
        var path = Path.Combine(_dir, "a.safetensors");
        Safetensors.Save(path, tensors, new Dictionary<string, string> { ["format"] = "pt", ["note"] = "é" });
        Assert.Empty(Directory.GetFiles(_dir, "*.tmp"));
        var raw = File.ReadAllBytes(path);
        var headerLen = BitConverter.ToInt64(raw, 0);
        Assert.Equal(0, headerLen % 8);
        var loaded = Safetensors.Load(path);
        Assert.Equal(tensors.Keys.Order(), loaded.Keys.Order());
        foreach (var (name, t) in tensors)
        {
            Assert.Equal(t.DType, loaded[name].DType);
            Assert.Equal(t.Shape, loaded[name].Shape);
            Assert.Equal(t.ToBytes(), loaded[name].ToBytes());
        }
        Assert.Equal("é", Safetensors.ReadMetadata(path)["note"]);
        using var f = SafetensorsFile.Open(path);
        Assert.Equal("BF16", f.Entries["w.bf16"].DType);
        Assert.Equal(ScalarType.Float32, f.Read("w.bf16", dtype: ScalarType.Float32).DType);
        Assert.Throws<SafetensorsException>(() => f.Read("nope"));
        // Saving again over the file replaces it.
        Safetensors.Save(path, new Dictionary<string, Tensor> { ["x"] = tensors["scalar"] });
        Assert.Equal(["x"], Safetensors.Load(path).Keys);
    }

    [Fact]
    public void LoadsShardedFolder()
    {
        using var scope = DisposeScope.Begin();
        var tensors = Sample();
        var names = tensors.Keys.Order().ToList();
        var shard1 = names.Take(3).ToDictionary(n => n, n => tensors[n]);
        var shard2 = names.Skip(3).ToDictionary(n => n, n => tensors[n]);
        Safetensors.Save(Path.Combine(_dir, "model-00001-of-00002.safetensors"), shard1);
        Safetensors.Save(Path.Combine(_dir, "model-00002-of-00002.safetensors"), shard2);
        var map = string.Join(",", shard1.Keys.Select(k => $"\"{k}\":\"model-00001-of-00002.safetensors\"")
            .Concat(shard2.Keys.Select(k => $"\"{k}\":\"model-00002-of-00002.safetensors\"")));
        File.WriteAllText(Path.Combine(_dir, "model.safetensors.index.json"), $"{{\"metadata\":{{\"total_size\":1}},\"weight_map\":{{{map}}}}}");
        var loaded = Safetensors.LoadModelFolder(_dir, dtype: ScalarType.Float32);
        Assert.Equal(names, loaded.Keys.Order());
        Assert.All(loaded.Values.Where(t => t.DType != ScalarType.Int64), t => Assert.Equal(ScalarType.Float32, t.DType));
        Assert.Equal(tensors["w.f32"].ToBytes(), loaded["w.f32"].ToBytes());
        Assert.True(tensors["w.bf16"].To(ScalarType.Float32).AllClose(loaded["w.bf16"]));
    }

    [Fact]
    public void SingleFileFolderAndMissingFolder()
    {
        using var scope = DisposeScope.Begin();
        Safetensors.Save(Path.Combine(_dir, "model.safetensors"), new Dictionary<string, Tensor> { ["a"] = Tensor.Ones([2]) });
        Assert.Equal(["a"], Safetensors.LoadModelFolder(_dir).Keys);
        var ex = Assert.Throws<SafetensorsException>(() => Safetensors.LoadModelFolder(Path.Combine(_dir, "none")));
        Assert.Contains("model.safetensors", ex.Message);
    }

    private string Write(string name, string header, int dataBytes, long? declaredLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var path = Path.Combine(_dir, name);
        using var fs = File.Create(path);
        fs.Write(BitConverter.GetBytes(declaredLength ?? h.Length));
        fs.Write(h);
        fs.Write(new byte[dataBytes]);
        return path;
    }

    [Theory]
    [InlineData("wronglen", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1_000_000L, "header length")]
    [InlineData("badjson", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],", 8, null, "not valid JSON")]
    [InlineData("truncated", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, null, "exceed")]
    [InlineData("range", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[100,108]}}", 8, null, "out of range")]
    [InlineData("dtype", "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8, null, "unknown dtype 'F8_E4M3'")]
    [InlineData("size", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, null, "needs 12")]
    [InlineData("overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, null, "overlap")]
    [InlineData("negative", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, null, "negative")]
    [InlineData("notobject", "[1,2]", 0, null, "not an object")]
    public void RejectsMalformedFiles(string name, string header, int dataBytes, long? declaredLength, string expected)
    {
        var path = Write(name, header, dataBytes, declaredLength);
        var ex = Assert.Throws<SafetensorsException>(() => Safetensors.Load(path));
        Assert.Contains(expected, ex.Message);
        Assert.Contains(path, ex.Message);
    }

    [Fact]
    public void RejectsTooShortFile()
    {
        var path = Path.Combine(_dir, "short");
        File.WriteAllBytes(path, [1, 2, 3]);
        var ex = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path));
        Assert.Contains("too short", ex.Message);
    }
}
