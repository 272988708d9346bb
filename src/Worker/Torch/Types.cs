using System.Globalization;

namespace FineTune.Worker.Torch;

/// <summary>Element types; values are c10's ScalarType codes so they cross the ABI unchanged.</summary>
public enum ScalarType : sbyte
{
    UInt8 = 0, Int8 = 1, Int16 = 2, Int32 = 3, Int64 = 4, Float16 = 5,
    Float32 = 6, Float64 = 7, Bool = 11, BFloat16 = 15,
}

public enum DeviceKind { Cpu, Cuda }

public readonly record struct Device(DeviceKind Kind, int Index = 0)
{
    public static Device Cpu => new(DeviceKind.Cpu);
    public static Device Cuda(int index = 0) => new(DeviceKind.Cuda, index);

    public static Device Parse(string s)
    {
        var v = s.Trim().ToLowerInvariant();
        if (v == "cpu") return Cpu;
        if (v == "cuda") return Cuda();
        if (v.StartsWith("cuda:", StringComparison.Ordinal)
            && int.TryParse(v.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture, out var i))
            return Cuda(i);
        throw new FormatException($"not a device: '{s}' (expected cpu, cuda or cuda:N)");
    }

    public override string ToString() => Kind == DeviceKind.Cpu ? "cpu" : $"cuda:{Index}";

    internal int NativeType => Kind == DeviceKind.Cuda ? 1 : 0;
}

/// <summary>An error raised by libtorch (message without the C++ backtrace).</summary>
public sealed class TorchException(string message) : Exception(message);

public static class ScalarTypes
{
    public static long ElementSize(this ScalarType t) => t switch
    {
        ScalarType.UInt8 or ScalarType.Int8 or ScalarType.Bool => 1,
        ScalarType.Int16 or ScalarType.Float16 or ScalarType.BFloat16 => 2,
        ScalarType.Int32 or ScalarType.Float32 => 4,
        ScalarType.Int64 or ScalarType.Float64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(t), t, "unsupported dtype"),
    };

    public static bool IsFloatingPoint(this ScalarType t) =>
        t is ScalarType.Float16 or ScalarType.Float32 or ScalarType.Float64 or ScalarType.BFloat16;

    /// <summary>The dtype whose elements a C# unmanaged type holds (ushort is ambiguous and maps to nothing).</summary>
    internal static ScalarType Of<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? ScalarType.Float32 :
        typeof(T) == typeof(double) ? ScalarType.Float64 :
        typeof(T) == typeof(long) ? ScalarType.Int64 :
        typeof(T) == typeof(int) ? ScalarType.Int32 :
        typeof(T) == typeof(short) ? ScalarType.Int16 :
        typeof(T) == typeof(sbyte) ? ScalarType.Int8 :
        typeof(T) == typeof(byte) ? ScalarType.UInt8 :
        typeof(T) == typeof(bool) ? ScalarType.Bool :
        typeof(T) == typeof(Half) ? ScalarType.Float16 :
        throw new ArgumentException($"no tensor dtype for element type {typeof(T).Name}");

    /// <summary>Whether T may read elements of dtype t: same kind and size (ushort reads any 16-bit float raw).</summary>
    internal static bool Matches<T>(ScalarType t) where T : unmanaged =>
        typeof(T) == typeof(ushort) ? t is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 : Of<T>() == t;
}
