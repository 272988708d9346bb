using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;

namespace FineTune.Worker.Torch;

public sealed class SafetensorsException(string path, string problem)
    : Exception($"{path}: {problem}")
{
    public string Path { get; } = path;
    public string Problem { get; } = problem;
}

public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End);

/// <summary>Reads and writes the safetensors format (8-byte LE header length, JSON header, raw little-endian data).</summary>
public static class Safetensors
{
    internal static readonly IReadOnlyDictionary<string, ScalarType> DTypes = new Dictionary<string, ScalarType>
    {
        ["F32"] = ScalarType.Float32, ["F16"] = ScalarType.Float16, ["BF16"] = ScalarType.BFloat16,
        ["F64"] = ScalarType.Float64, ["I64"] = ScalarType.Int64, ["I32"] = ScalarType.Int32,
        ["I16"] = ScalarType.Int16, ["I8"] = ScalarType.Int8, ["U8"] = ScalarType.UInt8, ["BOOL"] = ScalarType.Bool,
    };

    internal static string Name(ScalarType t) => DTypes.First(kv => kv.Value == t).Key;

    public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null) =>
        Save(path, tensors, metadata, _ => null);

    /// <summary>
    /// Writes <paramref name="tensors"/>, each converted to the dtype <paramref name="dtypeOf"/> gives its name (null: its
    /// own dtype). Tensors are read back and written one at a time, in slices of at most <paramref name="sliceBytes"/>
    /// along their first dimension, so saving a full model copy (a merged model, possibly on a GPU) never holds a second
    /// copy in memory.
    /// </summary>
    public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata,
                            Func<string, ScalarType?> dtypeOf, long sliceBytes = 64L << 20)
    {
        var names = tensors.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
        var dtypes = new List<ScalarType>(names.Count);
        var header = new Dictionary<string, object>();
        if (metadata is { Count: > 0 }) header["__metadata__"] = metadata;
        long offset = 0;
        foreach (var name in names)
        {
            if (name == "__metadata__") throw new SafetensorsException(path, "a tensor may not be named __metadata__");
            var t = tensors[name];
            var dtype = dtypeOf(name) ?? t.DType;
            dtypes.Add(dtype);
            var size = t.NumEl * ElementSize(dtype);
            header[name] = new Dictionary<string, object>
            {
                ["dtype"] = Name(dtype), ["shape"] = t.Shape, ["data_offsets"] = new[] { offset, offset + size },
            };
            offset += size;
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(header);
        var padded = (json.Length + 7) / 8 * 8; // data starts 8-byte aligned; padding is spaces, as the format allows
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        Directory.CreateDirectory(dir);
        var tmp = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> len = stackalloc byte[8];
                BitConverter.TryWriteBytes(len, (ulong)padded);
                if (!BitConverter.IsLittleEndian) len.Reverse();
                fs.Write(len);
                fs.Write(json);
                for (var i = json.Length; i < padded; i++) fs.WriteByte((byte)' ');
                for (var i = 0; i < names.Count; i++) WriteData(fs, tensors[names[i]], dtypes[i], sliceBytes);
                fs.Flush(true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch
        {
            File.Delete(tmp);
            throw;
        }
    }

    private static void WriteData(FileStream fs, Tensor t, ScalarType dtype, long sliceBytes)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.NoGrad();
        var rowBytes = t.Dim == 0 ? 0 : t.NumEl / Math.Max(1, t.Size(0)) * ElementSize(dtype);
        if (t.Dim == 0 || t.NumEl * ElementSize(dtype) <= sliceBytes)
        {
            fs.Write((t.DType == dtype ? t : t.To(dtype)).ToBytes());
            return;
        }
        var rows = Math.Max(1, sliceBytes / Math.Max(1, rowBytes));
        for (long start = 0; start < t.Size(0); start += rows)
        {
            using var slice = DisposeScope.Begin();
            var part = t.Narrow(0, start, Math.Min(rows, t.Size(0) - start));
            fs.Write((part.DType == dtype ? part : part.To(dtype)).ToBytes());
        }
    }

    /// <summary>Bytes per element of a dtype.</summary>
    public static long ElementSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        ScalarType.UInt8 or ScalarType.Int8 or ScalarType.Bool => 1,
        _ => throw new ArgumentException($"no safetensors dtype for {dtype}"),
    };

    public static Dictionary<string, Tensor> Load(string path, Device? device = null, ScalarType? dtype = null)
    {
        using var f = SafetensorsFile.Open(path);
        return f.Entries.Keys.ToDictionary(n => n, n => f.Read(n, device, dtype));
    }

    public static IReadOnlyDictionary<string, string> ReadMetadata(string path)
    {
        using var f = SafetensorsFile.Open(path);
        return f.Metadata;
    }

    /// <summary>Loads model.safetensors, or every shard named by model.safetensors.index.json.</summary>
    public static Dictionary<string, Tensor> LoadModelFolder(string folder, Device? device = null, ScalarType? dtype = null)
    {
        var single = System.IO.Path.Combine(folder, "model.safetensors");
        var index = System.IO.Path.Combine(folder, "model.safetensors.index.json");
        if (File.Exists(index))
        {
            var map = ReadIndex(index);
            var result = new Dictionary<string, Tensor>();
            foreach (var shard in map.GroupBy(kv => kv.Value))
            {
                var shardPath = System.IO.Path.Combine(folder, shard.Key);
                if (!File.Exists(shardPath)) throw new SafetensorsException(index, $"shard '{shard.Key}' does not exist");
                using var f = SafetensorsFile.Open(shardPath);
                foreach (var (name, _) in shard)
                {
                    if (!f.Entries.ContainsKey(name))
                        throw new SafetensorsException(shardPath, $"tensor '{name}' listed in the index is not in this shard");
                    result[name] = f.Read(name, device, dtype);
                }
            }
            return result;
        }
        if (File.Exists(single)) return Load(single, device, dtype);
        throw new SafetensorsException(folder, "neither model.safetensors nor model.safetensors.index.json found");
    }

    /// <summary>weight_map of a sharded checkpoint's index: tensor name → shard file name.</summary>
    public static IReadOnlyDictionary<string, string> ReadIndex(string indexPath)
    {
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(indexPath));
            if (!doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new SafetensorsException(indexPath, "index has no weight_map object");
            var map = new Dictionary<string, string>();
            foreach (var p in wm.EnumerateObject())
            {
                var file = p.Value.ValueKind == JsonValueKind.String ? p.Value.GetString()! : throw new SafetensorsException(indexPath, $"weight_map['{p.Name}'] is not a string");
                if (file.Contains('/') || file.Contains('\\') || file == ".." )
                    throw new SafetensorsException(indexPath, $"shard name '{file}' must be a plain file name");
                map[p.Name] = file;
            }
            return map;
        }
        catch (JsonException e)
        {
            throw new SafetensorsException(indexPath, $"index is not valid JSON: {e.Message}");
        }
    }
}

/// <summary>A memory-mapped safetensors file; the header is validated on open, tensors are read lazily.</summary>
public sealed unsafe class SafetensorsFile : IDisposable
{
    private readonly string _path;
    private readonly MemoryMappedFile? _mmf;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly long _dataStart;
    private byte* _base;

    private SafetensorsFile(string path, MemoryMappedFile? mmf, MemoryMappedViewAccessor? view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        (_path, _mmf, _view, _dataStart, Entries, Metadata) = (path, mmf, view, dataStart, entries, metadata);
        if (_view != null)
        {
            byte* p = null;
            _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            _base = p + _view.PointerOffset;
        }
    }

    public IReadOnlyDictionary<string, SafetensorsEntry> Entries { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new SafetensorsException(path, "file does not exist");
        var fileLength = new FileInfo(path).Length;
        if (fileLength < 8) throw new SafetensorsException(path, $"file is {fileLength} bytes, too short for the 8-byte header length");
        byte[] headerBytes;
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read))
        {
            Span<byte> len = stackalloc byte[8];
            fs.ReadExactly(len);
            var n = BitConverter.ToUInt64(len);
            if (n == 0 || n > (ulong)(fileLength - 8) || n > 100_000_000)
                throw new SafetensorsException(path, $"header length {n} does not fit the file of {fileLength} bytes");
            headerBytes = new byte[n];
            fs.ReadExactly(headerBytes);
        }
        var dataStart = 8 + headerBytes.LongLength;
        var dataLength = fileLength - dataStart;
        var (entries, metadata) = ParseHeader(path, headerBytes, dataLength);
        MemoryMappedFile? mmf = null;
        MemoryMappedViewAccessor? view = null;
        if (dataLength > 0)
        {
            mmf = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = mmf.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        }
        return new SafetensorsFile(path, mmf, view, dataStart, entries, metadata);
    }

    private static (Dictionary<string, SafetensorsEntry>, Dictionary<string, string>) ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(header); }
        catch (JsonException e) { throw new SafetensorsException(path, $"header is not valid JSON: {e.Message}"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new SafetensorsException(path, "header JSON is not an object");
            var entries = new Dictionary<string, SafetensorsEntry>();
            var metadata = new Dictionary<string, string>();
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                if (p.Name == "__metadata__")
                {
                    if (p.Value.ValueKind != JsonValueKind.Object) throw new SafetensorsException(path, "__metadata__ is not an object");
                    foreach (var m in p.Value.EnumerateObject())
                        metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String
                            ? m.Value.GetString()!
                            : throw new SafetensorsException(path, $"__metadata__ value '{m.Name}' is not a string");
                    continue;
                }
                entries[p.Name] = ParseEntry(path, p.Name, p.Value);
            }
            // Offsets must stay inside the data and no two tensors may share bytes.
            SafetensorsEntry? prev = null;
            foreach (var e in entries.Values.OrderBy(e => e.Begin).ThenBy(e => e.End))
            {
                if (e.End > dataLength)
                    throw new SafetensorsException(path, $"tensor '{e.Name}' data_offsets [{e.Begin}, {e.End}] exceed the {dataLength} data bytes (truncated file or offsets out of range)");
                if (prev != null && e.Begin < prev.End && e.End > e.Begin)
                    throw new SafetensorsException(path, $"tensors '{prev.Name}' and '{e.Name}' overlap");
                if (e.End > e.Begin) prev = e;
            }
            return (entries, metadata);
        }
    }

    private static SafetensorsEntry ParseEntry(string path, string name, JsonElement v)
    {
        string Bad(string what) => throw new SafetensorsException(path, $"tensor '{name}': {what}");
        if (v.ValueKind != JsonValueKind.Object) Bad("entry is not an object");
        if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String) Bad("missing dtype");
        var dtype = dt.GetString()!;
        if (!Safetensors.DTypes.TryGetValue(dtype, out var st)) Bad($"unknown dtype '{dtype}'");
        if (!v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array) Bad("missing shape");
        var shape = new List<long>();
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out var x) || x < 0) Bad("shape holds a non-integer or negative dimension");
            shape.Add(d.GetInt64());
        }
        if (!v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2) Bad("data_offsets must be [begin, end]");
        long begin = 0, end = 0;
        if (!off[0].TryGetInt64(out begin) || !off[1].TryGetInt64(out end) || begin < 0 || end < begin) Bad("data_offsets are not 0 <= begin <= end");
        long expected;
        try { expected = checked(shape.Aggregate(1L, (a, b) => a * b) * st.ElementSize()); }
        catch (OverflowException) { expected = -1; }
        if (expected != end - begin) Bad($"data_offsets span {end - begin} bytes but shape [{string.Join(",", shape)}] of {dtype} needs {expected}");
        return new SafetensorsEntry(name, dtype, shape.ToArray(), begin, end);
    }

    public Tensor Read(string name, Device? device = null, ScalarType? dtype = null)
    {
        if (_base == null && _view != null) throw new ObjectDisposedException(nameof(SafetensorsFile));
        if (!Entries.TryGetValue(name, out var e)) throw new SafetensorsException(_path, $"no tensor named '{name}'");
        var st = Safetensors.DTypes[e.DType];
        using var scope = DisposeScope.Begin();
        var t = Tensor.FromPointer(e.End > e.Begin ? _base + _dataStart + e.Begin : null, e.End - e.Begin, st, e.Shape);
        if (device is { Kind: DeviceKind.Cuda } || (dtype.HasValue && dtype.Value != st))
            t = t.To(device ?? Device.Cpu, dtype ?? st);
        return t.MoveToOuterScope();
    }

    public void Dispose()
    {
        if (_view != null && _base != null)
        {
            _base = null;
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
        _view?.Dispose();
        _mmf?.Dispose();
    }
}
