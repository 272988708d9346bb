Console.WriteLine("worker");
